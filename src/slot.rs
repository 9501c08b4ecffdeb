//! Redis Cluster's hash slots: which of the 16384 a key belongs to (computed as
//! Redis and redis-rs do), and the names that keep the keys one script touches
//! in one slot, as a cluster requires.

use std::sync::OnceLock;

/// The number of hash slots of a Redis Cluster.
pub(crate) const SLOTS: u16 = 16384;

/// The slot of `key`: CRC16 (XMODEM) of the key, or of its hash tag, modulo 16384.
///
/// The hash tag is what stands between the first `{` and the first `}` after it,
/// when that is not empty: `{user1}.name` and `{user1}.mail` share a slot.
pub(crate) fn key_slot(key: &[u8]) -> u16 {
    let hashed = hash_tag(key).unwrap_or(key);
    crc16(hashed) % SLOTS
}

/// The key's hash tag, if it has one.
pub(crate) fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|&b| b == b'{')?;
    let rest = &key[open + 1..];
    let close = rest.iter().position(|&b| b == b'}')?;
    (close > 0).then(|| &rest[..close])
}

/// The name of the companion key `key` + `suffix` in `key`'s slot: where `key`
/// has a hash tag the suffix keeps it; otherwise the whole key becomes the tag
/// (`job` → `{job}:fence`, which hashes as `job` does). `None` for a key
/// without a tag that holds a `}`: no tag can be made of it.
#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
pub(crate) fn companion(key: &str, suffix: &str) -> Option<String> {
    if hash_tag(key.as_bytes()).is_some() {
        return Some(format!("{key}{suffix}"));
    }
    (!key.contains('}')).then(|| format!("{{{key}}}{suffix}"))
}

/// A short text whose slot is `slot`: the hash tag of the key a cluster member
/// keeps for that slot (its epoch hash). The table of all 16384 is made once
/// per process, by counting up until every slot has one (about 160 000 CRCs):
/// a search per slot cost each first grant in a slot a third of a millisecond.
#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
pub(crate) fn tag_for(slot: u16) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); usize::from(SLOTS)];
        let mut missing = tags.len();
        for n in 0_u32.. {
            let tag = n.to_string();
            let at = usize::from(crc16(tag.as_bytes()) % SLOTS);
            if tags[at].is_empty() {
                tags[at] = tag;
                missing -= 1;
                if missing == 0 {
                    break;
                }
            }
        }
        tags
    });
    &tags[usize::from(slot % SLOTS)]
}

/// CRC-16/XMODEM: polynomial 0x1021, initial value 0, no reflection, as in Redis's
/// `crc16.c`.
fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0_u16, |crc, &byte| {
        (0..8).fold(crc ^ (u16::from(byte) << 8), |crc, _| {
            if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_the_reference_check_value() {
        // The check value of CRC-16/XMODEM, quoted in Redis's crc16.c.
        assert_eq!(crc16(b"123456789"), 0x31C3);
    }

    #[test]
    fn slots_match_those_redis_documents() {
        // From the Redis Cluster specification and `CLUSTER KEYSLOT`'s documentation.
        assert_eq!(key_slot(b"somekey"), 11058);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"{user1000}.followers"), key_slot(b"user1000"));
    }

    #[test]
    fn only_a_non_empty_first_tag_counts() {
        // `{}` is no tag: the whole key is hashed.
        assert_eq!(hash_tag(b"foo{}{bar}"), None);
        assert_eq!(hash_tag(b"foo{{bar}}zap"), Some(&b"{bar"[..]));
        assert_eq!(hash_tag(b"foo{bar}{zap}"), Some(&b"bar"[..]));
        assert_eq!(hash_tag(b"no tag"), None);
        assert_eq!(hash_tag(b"open{only"), None);
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
    }

    #[test]
    fn companions_share_the_key_slot() {
        for key in ["job", "locks:job", "{user1}.job", "a{b", "a{b}c"] {
            let fence = companion(key, ":fence").unwrap();
            assert_eq!(
                key_slot(fence.as_bytes()),
                key_slot(key.as_bytes()),
                "{key} → {fence}"
            );
        }
        assert_eq!(companion("job", ":fence").as_deref(), Some("{job}:fence"));
        assert_eq!(
            companion("{t}job", ":fence").as_deref(),
            Some("{t}job:fence")
        );
        assert_eq!(companion("a}b", ":fence"), None);
    }

    #[test]
    fn every_slot_has_a_tag() {
        for slot in [0, 1, 5460, 5461, 12182, SLOTS - 1] {
            let tag = tag_for(slot);
            assert_eq!(key_slot(format!("epoch:{{{tag}}}").as_bytes()), slot);
        }
    }
}
