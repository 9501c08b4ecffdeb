//! An in-process instance with the semantics of the Redis commands and scripts,
//! plus controls for the faults the quorum logic must survive: latency, errors,
//! a stopped process, a restart without persistence and a drifting clock.
//!
//! Here, the public type and the test's own view of the keys; in `store`, the
//! keys and the scripts' semantics (the Lua of `scripts.rs` again, in Rust); in
//! `clock` and `faults`, the controls; in `adapter`, the instance seam over them.

mod adapter;
mod clock;
mod faults;
mod store;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::broadcast;

use self::clock::Clock;
use self::faults::Queued;
use self::store::{Entry, Store};
use super::Instance;

/// An in-process lock instance: a key-value store with millisecond expiry that
/// answers the locker exactly as a Redis server running quorumlock's scripts would.
///
/// Use it to unit-test code that takes locks without running Redis, and to put a
/// locker through faults deterministically: every delay and every expiry follows
/// Tokio's clock, so under [`tokio::time::pause`] (or
/// `#[tokio::test(start_paused = true)]`, both from Tokio's `test-util` feature) a
/// test advances time instead of sleeping.
///
/// [`tokio::time::pause`]: https://docs.rs/tokio/1/tokio/time/fn.pause.html
///
/// - [`set_latency`](Self::set_latency): each operation takes a round trip;
/// - [`set_failing`](Self::set_failing): each operation answers an I/O error;
/// - [`pause`](Self::pause) / [`resume`](Self::resume): the process is stopped,
///   as by `SIGSTOP`;
/// - [`restart_empty`](Self::restart_empty): a restart without persistence;
/// - [`set_clock_rate`](Self::set_clock_rate): the server's clock runs fast or slow;
/// - [`get`](Self::get), [`pttl`](Self::pttl), [`keys`](Self::keys),
///   [`set`](Self::set), [`remove`](Self::remove), [`commands`](Self::commands):
///   look at or tamper with the stored keys, as another client of the server could.
///
/// Clones are the same instance: keep one to control it after handing one to
/// [`Builder::memory`](crate::Builder::memory).
///
/// # Examples
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
/// use std::time::Duration;
/// use quorumlock::{MemoryInstance, QuorumLocker};
///
/// let (a, b, c) = (MemoryInstance::new("a"), MemoryInstance::new("b"), MemoryInstance::new("c"));
/// let locker = QuorumLocker::builder()
///     .memory(&a)
///     .memory(&b)
///     .memory(&c)
///     .build()
///     .await?;
///
/// // One instance down: two of three still make a quorum.
/// c.set_failing(true);
/// let lock = locker.acquire("nightly-report", Duration::from_secs(30)).await?;
/// // Each holds `token nonce` (see `LockValue`).
/// assert!(a.get("nightly-report").unwrap().starts_with(lock.token()));
/// assert!(b.get("nightly-report").unwrap().starts_with(lock.token()));
/// assert_eq!(c.get("nightly-report"), None);
///
/// assert_eq!(lock.release().await?, 2);
/// assert!(a.keys().is_empty() && b.keys().is_empty());
/// # Ok::<_, quorumlock::Error>(())
/// # })?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MemoryInstance {
    inner: Arc<Inner>,
}

struct Inner {
    name: Arc<str>,
    state: Mutex<State>,
    /// `(channel, message)` of every `PUBLISH` a release made: the in-process
    /// equivalent of pub/sub, for lockers that wake waiters.
    published: broadcast::Sender<(Arc<str>, Arc<str>)>,
}

/// Published messages kept for slow subscribers; older ones are dropped (the
/// waiter then falls back to its timed retry, as with a lost message).
const PUBLISHED_BACKLOG: usize = 1024;

struct State {
    store: Store,
    clock: Clock,
    latency: Duration,
    failing: bool,
    paused: bool,
    /// Requests that reached the instance while it was paused, in arrival
    /// order, and whether each is a lock command.
    queued: Vec<(bool, Queued)>,
    commands: u64,
}

impl MemoryInstance {
    /// A new, empty, healthy instance called `name`, with no latency and a clock
    /// that starts at the system time and follows Tokio's clock at rate 1.
    ///
    /// The name shows in the locker's errors, and must differ from every other
    /// instance's name in one locker.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            inner: Arc::new(Inner {
                name: name.into().into(),
                state: Mutex::new(State {
                    store: Store::new(),
                    clock: Clock::system(),
                    latency: Duration::ZERO,
                    failing: false,
                    paused: false,
                    queued: Vec::new(),
                    commands: 0,
                }),
                published: broadcast::channel(PUBLISHED_BACKLOG).0,
            }),
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub(crate) fn instance(&self) -> Box<dyn Instance> {
        Box::new(self.clone())
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state()
    }

    /// The value stored under `key`, unless it is absent or expired.
    pub fn get(&self, key: &str) -> Option<String> {
        self.inspect(|store, now| store.live(key, now).map(|entry| entry.value.to_string()))
    }

    /// The time `key` has left on the instance's clock; `None` when it is absent,
    /// expired, or set without a TTL (tell those apart with [`get`](Self::get)).
    pub fn pttl(&self, key: &str) -> Option<Duration> {
        self.inspect(|store, now| {
            let expires_at = store.live(key, now)?.expires_at?;
            Some(expires_at.saturating_sub(now))
        })
    }

    /// Every key that has not expired, sorted, apart from the identity each
    /// locker keeps on purpose (the hash [`EPOCH_KEY`](crate::EPOCH_KEY)).
    pub fn keys(&self) -> Vec<String> {
        self.inspect(|store, now| {
            store.sweep(now);
            let mut keys: Vec<String> = store.keys.keys().map(|key| key.to_string()).collect();
            keys.sort_unstable();
            keys
        })
    }

    /// Deletes `key` behind its owner's back, as an operator's `DEL` would; true if
    /// it was there. That includes an epoch hash ([`EPOCH_KEY`](crate::EPOCH_KEY)
    /// after the key prefix), as a flush would lose it.
    pub fn remove(&self, key: &str) -> bool {
        self.inspect(|store, now| {
            let live = store.live(key, now).is_some();
            store.keys.remove(key);
            // On a server the epoch hash is a key like any other.
            let epoch = store.remove_epoch(key);
            live || epoch
        })
    }

    /// Stores `value` under `key` whatever it held, expiring after `ttl` on the
    /// instance's clock (never with `None`): a lock planted as another owner
    /// would hold it.
    pub fn set(&self, key: &str, value: &str, ttl: Option<Duration>) {
        self.inspect(|store, now| {
            let expires_at = ttl.map(|ttl| now.saturating_add(ttl));
            store.insert(
                key.into(),
                Entry {
                    value: value.into(),
                    expires_at,
                },
                now,
            );
        });
    }

    /// How many lock commands the instance has applied or answered: each
    /// acquisition attempt, extend, release or rollback that reached it counts one.
    /// The locker's health probes and script loads do not count, nor do the
    /// inspection and tampering methods.
    pub fn commands(&self) -> u64 {
        self.state().commands
    }

    /// Runs `look` on the keys at the instance's current time, bypassing latency,
    /// failure and pause: the test's view, not a client's.
    fn inspect<T>(&self, look: impl FnOnce(&mut Store, Duration) -> T) -> T {
        let mut state = self.state();
        let now = state.clock.now();
        look(&mut state.store, now)
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for MemoryInstance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        let now = state.clock.now();
        let keys = state
            .store
            .keys
            .values()
            .filter(|entry| entry.is_live(now))
            .count();
        f.debug_struct("MemoryInstance")
            .field("name", &self.inner.name)
            .field("keys", &keys)
            .field("clock_rate", &state.clock.rate())
            .field("latency", &state.latency)
            .field("paused", &state.paused)
            .field("failing", &state.failing)
            .finish()
    }
}

/// What the tests of this folder's files share.
#[cfg(test)]
mod testkit {
    use std::sync::Arc;

    pub(super) const KEY: &str = "job";

    pub(super) fn arc(text: &str) -> Arc<str> {
        text.into()
    }
}
