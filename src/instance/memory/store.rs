//! The key space and the semantics of quorumlock's scripts on it: each
//! script of `scripts.rs` again, as the Rust that a memory instance runs in
//! place of the Lua, answering what Redis would (errors included).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::{ErrorKind, RedisError, ServerErrorKind};

use crate::epoch::{self, Epoch};
/// A script's outcome: done (true) or refused.
type Done = Result<bool, redis::RedisError>;
/// A fenced grant's outcome: the fencing counter, 0 where refused.
type Count = Result<u64, redis::RedisError>;

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) value: Arc<str>,
    /// On the server's clock; `None` never expires.
    pub(super) expires_at: Option<Duration>,
}

impl Entry {
    pub(super) fn is_live(&self, now: Duration) -> bool {
        self.expires_at.is_none_or(|at| now < at)
    }
}

/// The keys and the identity of the running "process": what a restart loses.
pub(super) struct Store {
    pub(super) keys: HashMap<Arc<str>, Entry>,
    /// The epoch hashes (see `epoch`), apart from the keys: they are the
    /// locker's bookkeeping, not locks, and [`MemoryInstance::keys`](super::MemoryInstance::keys) leaves
    /// them out as it does on a real server.
    epochs: HashMap<Arc<str>, EpochHash>,
    pub(super) run_id: String,
    /// Expiry is lazy, so keys nobody reads again would pile up: sweep every expired
    /// key once the map has doubled since the last sweep (amortised O(1)).
    sweep_at: usize,
}

const MIN_SWEEP: usize = 64;

/// An epoch hash's fields.
#[derive(Default)]
struct EpochHash {
    id: Option<Arc<str>>,
    longest_ttl_ms: u64,
}

impl Store {
    pub(super) fn new() -> Self {
        Self {
            keys: HashMap::new(),
            epochs: HashMap::new(),
            run_id: new_run_id(),
            sweep_at: MIN_SWEEP,
        }
    }

    /// The entry under `key` if it has not expired; an expired one is removed.
    pub(super) fn live(&mut self, key: &str, now: Duration) -> Option<&mut Entry> {
        if self.keys.get(key).is_some_and(|entry| !entry.is_live(now)) {
            self.keys.remove(key);
        }
        self.keys.get_mut(key)
    }

    pub(super) fn insert(&mut self, key: Arc<str>, entry: Entry, now: Duration) {
        self.keys.insert(key, entry);
        if self.keys.len() >= self.sweep_at {
            self.sweep(now);
        }
    }

    /// `GET` and `PTTL` of `key` together: its value and time left (`None`
    /// for no expiry), or `None` where it is missing.
    pub(super) fn peek(&mut self, key: &str, now: Duration) -> Option<(String, Option<Duration>)> {
        let entry = self.live(key, now)?;
        let ttl = entry.expires_at.map(|at| at.saturating_sub(now));
        Some((entry.value.to_string(), ttl))
    }

    /// Deletes the epoch hash under `key`, as a `DEL` of it would; whether
    /// there was one.
    pub(super) fn remove_epoch(&mut self, key: &str) -> bool {
        self.epochs.remove(key).is_some()
    }

    pub(super) fn sweep(&mut self, now: Duration) {
        self.keys.retain(|_, entry| entry.is_live(now));
        self.sweep_at = (self.keys.len() * 2).max(MIN_SWEEP);
    }

    /// `SET key value NX PX ttl_ms`.
    pub(super) fn set_nx_px(
        &mut self,
        key: &Arc<str>,
        value: &Arc<str>,
        ttl_ms: u64,
        now: Duration,
    ) -> Done {
        let expires_at = set_deadline(now, ttl_ms)?;
        if self.live(key, now).is_some() {
            return Ok(false);
        }
        self.insert(
            Arc::clone(key),
            Entry {
                value: Arc::clone(value),
                expires_at: Some(expires_at),
            },
            now,
        );
        Ok(true)
    }

    /// The `RETAKE` script: `SET NX PX`, or where the key holds a value with
    /// `token` followed by a space (what this token's holder set), `value` in
    /// its place.
    pub(super) fn retake(
        &mut self,
        key: &Arc<str>,
        token: &str,
        value: &Arc<str>,
        ttl_ms: u64,
        now: Duration,
    ) -> Done {
        // SET checks its PX before NX, so a bad TTL fails even on a held key.
        let expires_at = set_deadline(now, ttl_ms)?;
        match self.live(key, now) {
            Some(entry) if holds_token(&entry.value, token) => {
                *entry = Entry {
                    value: Arc::clone(value),
                    expires_at: Some(expires_at),
                };
                Ok(true)
            }
            Some(_) => Ok(false),
            None => self.set_nx_px(key, value, ttl_ms, now),
        }
    }

    /// The `EXTEND` script.
    pub(super) fn extend(&mut self, key: &str, value: &str, ttl_ms: u64, now: Duration) -> Done {
        let Some(entry) = self.live(key, now) else {
            return Ok(false);
        };
        if *entry.value != *value {
            return Ok(false);
        }
        let expires_at = deadline(now, ttl_ms).ok_or_else(|| invalid_expire("pexpire"))?;
        if ttl_ms == 0 {
            // PEXPIRE to a time already reached deletes the key and answers 1.
            self.keys.remove(key);
        } else {
            entry.expires_at = Some(expires_at);
        }
        Ok(true)
    }

    /// `INCR key`: the counter after incrementing; keeps any TTL. As Redis, only
    /// on a signed 64-bit integer written as Redis writes it, and refusing to
    /// overflow.
    fn incr(&mut self, key: &Arc<str>, now: Duration) -> Result<i64, RedisError> {
        let next = match self.live(key, now) {
            Some(entry) => {
                let current = redis_integer(&entry.value).ok_or_else(not_an_integer)?;
                let next = current.checked_add(1).ok_or_else(|| {
                    RedisError::from((
                        ErrorKind::Server(ServerErrorKind::ResponseError),
                        "increment or decrement would overflow",
                    ))
                })?;
                entry.value = next.to_string().into();
                return Ok(next);
            }
            None => 1,
        };
        self.insert(
            Arc::clone(key),
            Entry {
                value: next.to_string().into(),
                expires_at: None,
            },
            now,
        );
        Ok(next)
    }

    /// The check every granting script starts with: the epoch key holds the
    /// verified epoch.
    fn epoch_holds(&self, epoch: Option<&Epoch>) -> Result<(), RedisError> {
        let Some(epoch) = epoch else {
            return Ok(());
        };
        let id = self
            .epochs
            .get(&epoch.key)
            .and_then(|hash| hash.id.as_ref());
        let same_server = epoch
            .run_id
            .as_ref()
            .is_none_or(|run_id| **run_id == *self.run_id);
        if id == Some(&epoch.id) && same_server {
            Ok(())
        } else {
            Err(epoch::changed())
        }
    }

    /// A grant as the granting scripts make it: only on the verified server,
    /// and raising the longest TTL where the locker asked.
    pub(super) fn checked(
        &mut self,
        epoch: Option<&Epoch>,
        ttl_ms: u64,
        grant: impl FnOnce(&mut Self) -> Done,
    ) -> Done {
        self.epoch_holds(epoch)?;
        let granted = grant(self)?;
        if granted {
            let raise = epoch.filter(|epoch| epoch.raise);
            self.raise(raise.map(|epoch| &epoch.key), ttl_ms);
        }
        Ok(granted)
    }

    /// What every grant and extend does after it set a TTL, where it has the
    /// epoch hash's key: raises the longest TTL kept there (`HSET`, which
    /// creates the hash if it is missing).
    pub(super) fn raise(&mut self, epoch_key: Option<&Arc<str>>, ttl_ms: u64) {
        if let Some(key) = epoch_key {
            let hash = self.epochs.entry(Arc::clone(key)).or_default();
            hash.longest_ttl_ms = hash.longest_ttl_ms.max(ttl_ms);
        }
    }

    /// The probe's `HSETNX epoch id candidate` and `HMGET epoch id ttl`.
    pub(super) fn epoch(&mut self, key: &Arc<str>, candidate: &Arc<str>) -> (Arc<str>, u64) {
        let hash = self.epochs.entry(Arc::clone(key)).or_default();
        let id = hash.id.get_or_insert_with(|| Arc::clone(candidate));
        (Arc::clone(id), hash.longest_ttl_ms)
    }

    /// The `FENCED_SET` and `FENCED_RETAKE` scripts: a grant, then `INCR fence`;
    /// a counter someone set below zero, or at 2^53 or more (where the
    /// script's Lua would round it), fails the script, as on Redis (the key it
    /// set is then the locker's to roll back, as for any failed vote).
    pub(super) fn fenced(&mut self, granted: Done, fence: &Arc<str>, now: Duration) -> Count {
        if !granted? {
            return Ok(0);
        }
        let counter = self.incr(fence, now)?;
        u64::try_from(counter)
            .ok()
            .filter(|counter| (1..1 << 53).contains(counter))
            .ok_or_else(|| {
                RedisError::from((
                    ErrorKind::Server(ServerErrorKind::ResponseError),
                    "the fencing counter is outside 1 to 2^53 - 1",
                ))
            })
    }

    /// The `FENCE_WRITE_BACK` script.
    pub(super) fn fence_write_back(
        &mut self,
        key: &str,
        fence: &Arc<str>,
        value: &str,
        token: u64,
        now: Duration,
    ) -> Done {
        match self.live(key, now) {
            Some(entry) if *entry.value == *value => {}
            _ => return Ok(false),
        }
        let current = self
            .live(fence, now)
            .and_then(|entry| entry.value.parse::<u64>().ok());
        if current.is_none_or(|current| current < token) {
            self.insert(
                Arc::clone(fence),
                Entry {
                    value: token.to_string().into(),
                    expires_at: None,
                },
                now,
            );
        }
        Ok(true)
    }

    /// The `RELEASE` script.
    pub(super) fn release(&mut self, key: &str, value: &str, now: Duration) -> Done {
        match self.live(key, now) {
            Some(entry) if *entry.value == *value => {
                self.keys.remove(key);
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// As the `RETAKE` script: whether `held` starts with `token` and a space.
fn holds_token(held: &str, token: &str) -> bool {
    held.strip_prefix(token)
        .is_some_and(|rest| rest.starts_with(' '))
}

/// `now + ttl_ms`, or `None` where Redis would refuse it: past `i64::MAX` ms since
/// the epoch.
fn deadline(now: Duration, ttl_ms: u64) -> Option<Duration> {
    let now_ms = u64::try_from(now.as_millis()).ok()?;
    let at_ms = now_ms.checked_add(ttl_ms)?;
    i64::try_from(at_ms)
        .is_ok()
        .then(|| now + Duration::from_millis(ttl_ms))
}

/// The deadline of `SET … PX ttl_ms`, which refuses a zero TTL.
fn set_deadline(now: Duration, ttl_ms: u64) -> Result<Duration, RedisError> {
    deadline(now, ttl_ms)
        .filter(|_| ttl_ms > 0)
        .ok_or_else(|| invalid_expire("set"))
}

/// The integer Redis reads in `value` (its `string2ll`): decimal digits after
/// an optional `-`, no leading zero, no `+`, no spaces, within `i64`.
fn redis_integer(value: &str) -> Option<i64> {
    let digits = value.strip_prefix('-').unwrap_or(value);
    let canonical = value == "0"
        || (digits.starts_with(|c: char| c.is_ascii_digit() && c != '0')
            && digits.bytes().all(|byte| byte.is_ascii_digit()));
    canonical.then(|| value.parse().ok()).flatten()
}

fn not_an_integer() -> RedisError {
    RedisError::from((
        ErrorKind::Server(ServerErrorKind::ResponseError),
        "value is not an integer or out of range",
    ))
}

fn invalid_expire(command: &str) -> RedisError {
    RedisError::from((
        ErrorKind::Server(ServerErrorKind::ResponseError),
        "invalid expire time",
        format!("invalid expire time in '{command}' command"),
    ))
}

/// 40 hex digits, like Redis's `run_id`, fresh on every call.
fn new_run_id() -> String {
    static RESTARTS: AtomicU64 = AtomicU64::new(0);
    let restart = RESTARTS.fetch_add(1, Ordering::Relaxed);
    // Each `RandomState` is keyed from the OS's randomness: ids are unpredictable
    // across processes, and the counter keeps them apart within one.
    let keys = RandomState::new();
    let mut id: String = (0u64..3)
        .map(|part| format!("{:016x}", keys.hash_one((restart, part))))
        .collect();
    id.truncate(40);
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::memory::testkit::{arc, KEY};
    use crate::instance::memory::MemoryInstance;
    use crate::instance::Instance;

    #[tokio::test(start_paused = true)]
    async fn retake_sets_a_free_key_and_replaces_its_own_only() {
        let instance = MemoryInstance::new("m");
        let (key, token) = (arc(KEY), arc("tok"));
        let first = arc("tok first");
        assert!(instance
            .retake(&key, &token, &first, 1000, None)
            .await
            .unwrap());
        assert_eq!(instance.get(KEY).as_deref(), Some("tok first"));

        tokio::time::advance(Duration::from_millis(600)).await;
        assert_eq!(instance.pttl(KEY), Some(Duration::from_millis(400)));
        let second = arc("tok second");
        assert!(instance
            .retake(&key, &token, &second, 1000, None)
            .await
            .unwrap());
        assert_eq!(instance.get(KEY).as_deref(), Some("tok second"));
        assert_eq!(instance.pttl(KEY), Some(Duration::from_millis(1000)));

        // Our token then a space matches; the token alone (no nonce) or a longer
        // token that starts with ours does not.
        instance.set(KEY, "tok 1a2b3c4d", None);
        assert!(instance
            .retake(&key, &token, &first, 1000, None)
            .await
            .unwrap());
        assert_eq!(instance.pttl(KEY), Some(Duration::from_millis(1000)));
        instance.set(KEY, "tok", None);
        assert!(!instance
            .retake(&key, &token, &first, 1000, None)
            .await
            .unwrap());
        instance.set(KEY, "token meta", None);
        assert!(!instance
            .retake(&key, &token, &first, 1000, None)
            .await
            .unwrap());
        assert_eq!(instance.get(KEY).as_deref(), Some("token meta"));
        assert_eq!(instance.pttl(KEY), None);

        // As SET, a zero TTL is an error even where the key is ours.
        instance.set(KEY, "tok", None);
        assert!(instance
            .retake(&key, &token, &first, 0, None)
            .await
            .is_err());
        assert_eq!(instance.get(KEY).as_deref(), Some("tok"));
        assert_eq!(instance.commands(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn extend_renews_its_own_key_and_never_creates_one() {
        let instance = MemoryInstance::new("m");
        let (key, mine) = (arc(KEY), arc("mine"));
        assert!(!instance.extend(&key, &mine, 1000, None).await.unwrap());
        assert_eq!(instance.get(KEY), None, "extend created the key");

        instance.set(KEY, "mine", Some(Duration::from_millis(100)));
        assert!(instance.extend(&key, &mine, 5000, None).await.unwrap());
        assert_eq!(instance.pttl(KEY), Some(Duration::from_millis(5000)));
        assert!(!instance
            .extend(&key, &arc("theirs"), 9000, None)
            .await
            .unwrap());
        assert_eq!(instance.pttl(KEY), Some(Duration::from_millis(5000)));

        tokio::time::advance(Duration::from_millis(5000)).await;
        assert!(!instance.extend(&key, &mine, 1000, None).await.unwrap());
        assert_eq!(instance.get(KEY), None);

        // PEXPIRE 0 deletes the key and answers 1.
        instance.set(KEY, "mine", None);
        assert!(instance.extend(&key, &mine, 0, None).await.unwrap());
        assert_eq!(instance.get(KEY), None);
    }

    #[tokio::test(start_paused = true)]
    async fn set_nx_px_and_release_compare_values() {
        let instance = MemoryInstance::new("m");
        let (key, mine, theirs) = (arc(KEY), arc("mine"), arc("theirs"));
        assert!(instance.set_nx_px(&key, &mine, 1000, None).await.unwrap());
        assert!(!instance.set_nx_px(&key, &theirs, 1000, None).await.unwrap());
        assert!(!instance.release(&key, &theirs).await.unwrap());
        assert_eq!(instance.get(KEY).as_deref(), Some("mine"));
        assert!(instance.release(&key, &mine).await.unwrap());
        assert!(!instance.release(&key, &mine).await.unwrap());
        assert!(instance.set_nx_px(&key, &mine, 0, None).await.is_err());
        assert!(instance
            .set_nx_px(&key, &mine, u64::MAX, None)
            .await
            .is_err());
        assert_eq!(instance.get(KEY), None);
        instance.load_scripts().await.unwrap();
    }

    /// As Redis's `string2ll`, which `INCR` reads its counter with.
    #[test]
    fn incr_reads_only_what_redis_reads_as_an_integer() {
        for (value, read) in [
            ("0", Some(0)),
            ("7", Some(7)),
            ("-7", Some(-7)),
            ("9223372036854775807", Some(i64::MAX)),
            ("-9223372036854775808", Some(i64::MIN)),
        ] {
            assert_eq!(redis_integer(value), read, "{value:?}");
        }
        for value in [
            "",
            "-",
            "-0",
            "00",
            "007",
            "+3",
            " 3",
            "3 ",
            "x",
            "1e3",
            "18446744073709551615",
        ] {
            assert_eq!(redis_integer(value), None, "{value:?}");
        }
    }

    #[test]
    fn lazy_expiry_does_not_accumulate_keys() {
        let mut store = Store::new();
        let value = arc("v");
        for i in 0..10_000u64 {
            let now = Duration::from_secs(1_000_000) + Duration::from_millis(i * 10);
            let key: Arc<str> = format!("k{i}").into();
            assert!(store.set_nx_px(&key, &value, 5, now).unwrap());
        }
        assert!(
            store.keys.len() <= 2 * MIN_SWEEP,
            "{} keys kept",
            store.keys.len()
        );
    }
}
