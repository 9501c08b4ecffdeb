//! The names quorumlock gives its own keys in Redis, beside the locks: the
//! epoch hash and the fencing counters. A lock key may not take one of them.

use std::sync::Arc;

/// The key, after the locker's key prefix, of the hash that holds the server's
/// identity (`id`) and the longest TTL set there (`ttl`): one per server and
/// prefix, never expiring, like the fencing counters. A lock key ending in this
/// name is refused.
pub const EPOCH_KEY: &str = "quorumlock:epoch";

/// Appended to a lock's key (after the locker's prefix) to name its fencing
/// counter: `locks:job` counts in `locks:job:fence`. A lock key ending in this suffix is refused.
pub const FENCE_SUFFIX: &str = ":fence";

/// The fencing counter's key for the lock key `redis_key` (prefix included).
pub(crate) fn fence_key(redis_key: &str) -> Arc<str> {
    format!("{redis_key}{FENCE_SUFFIX}").into()
}

/// Whether a lock key (prefix included) would be one of ours.
/// A cluster member's epoch hashes, one per slot, are named `EPOCH_KEY:{tag}`.
pub(crate) fn is_reserved(redis_key: &str) -> bool {
    redis_key.ends_with(EPOCH_KEY)
        || redis_key.ends_with(FENCE_SUFFIX)
        || redis_key.contains(&format!("{EPOCH_KEY}:{{"))
}
