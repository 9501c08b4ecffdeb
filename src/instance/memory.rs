//! An in-process instance with the semantics of the Redis commands and scripts,
//! plus controls for the faults the quorum logic must survive: latency, errors,
//! a stopped process, a restart without persistence and a drifting clock.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::{ErrorKind, RedisError, ServerErrorKind};
use tokio::sync::{broadcast, oneshot};
use tokio::time::Instant;

use super::{BoxFuture, Counter, Instance, Probe, PubSubSource, Reply};
use crate::epoch::{self, Epoch};
use crate::error::Error;

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
    /// Requests that reached the instance while it was paused, in arrival order.
    /// Requests waiting in a paused instance, and whether each is a lock command.
    queued: Vec<(bool, Queued)>,
    commands: u64,
}

/// A request waiting for `resume`; it sends its own reply.
type Queued = Box<dyn FnOnce(&mut Store, Duration) + Send>;

/// The server's clock: `at` when Tokio's clock read `anchor`, running `rate` times
/// as fast since.
#[derive(Debug, Clone, Copy)]
struct Clock {
    anchor: Instant,
    at: Duration,
    rate: f64,
}

impl Clock {
    fn now(&self) -> Duration {
        // Saturating: an instance made outside a paused runtime may be anchored
        // ahead of that runtime's clock.
        let elapsed = Instant::now().saturating_duration_since(self.anchor);
        let scaled = if self.rate == 1.0 {
            // Exact, where the float product would round after ~100 days.
            elapsed
        } else {
            Duration::try_from_secs_f64(elapsed.as_secs_f64() * self.rate).unwrap_or(Duration::MAX)
        };
        self.at.saturating_add(scaled)
    }
}

#[derive(Debug)]
struct Entry {
    value: Arc<str>,
    /// On the server's clock; `None` never expires.
    expires_at: Option<Duration>,
}

impl Entry {
    fn is_live(&self, now: Duration) -> bool {
        self.expires_at.is_none_or(|at| now < at)
    }
}

/// The keys and the identity of the running "process": what a restart loses.
struct Store {
    keys: HashMap<Arc<str>, Entry>,
    /// The epoch hashes (see `epoch`), apart from the keys: they are the
    /// locker's bookkeeping, not locks, and [`MemoryInstance::keys`] leaves
    /// them out as it does on a real server.
    epochs: HashMap<Arc<str>, EpochHash>,
    run_id: String,
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
    fn new() -> Self {
        Self {
            keys: HashMap::new(),
            epochs: HashMap::new(),
            run_id: new_run_id(),
            sweep_at: MIN_SWEEP,
        }
    }

    /// The entry under `key` if it has not expired; an expired one is removed.
    fn live(&mut self, key: &str, now: Duration) -> Option<&mut Entry> {
        if self.keys.get(key).is_some_and(|entry| !entry.is_live(now)) {
            self.keys.remove(key);
        }
        self.keys.get_mut(key)
    }

    fn insert(&mut self, key: Arc<str>, entry: Entry, now: Duration) {
        self.keys.insert(key, entry);
        if self.keys.len() >= self.sweep_at {
            self.sweep(now);
        }
    }

    fn sweep(&mut self, now: Duration) {
        self.keys.retain(|_, entry| entry.is_live(now));
        self.sweep_at = (self.keys.len() * 2).max(MIN_SWEEP);
    }

    /// `SET key value NX PX ttl_ms`.
    fn set_nx_px(&mut self, key: &Arc<str>, value: &Arc<str>, ttl_ms: u64, now: Duration) -> Reply {
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
    /// `token` (alone, or followed by a space and metadata), `value` in its place.
    fn retake(
        &mut self,
        key: &Arc<str>,
        token: &str,
        value: &Arc<str>,
        ttl_ms: u64,
        now: Duration,
    ) -> Reply {
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
    fn extend(&mut self, key: &str, value: &str, ttl_ms: u64, now: Duration) -> Reply {
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
        if id == Some(&epoch.value) && same_server {
            Ok(())
        } else {
            Err(epoch::changed())
        }
    }

    /// A grant as the granting scripts make it: only on the verified server,
    /// and raising the longest TTL where the locker asked.
    fn checked(
        &mut self,
        epoch: Option<&Epoch>,
        ttl_ms: u64,
        grant: impl FnOnce(&mut Self) -> Reply,
    ) -> Reply {
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
    fn raise(&mut self, epoch_key: Option<&Arc<str>>, ttl_ms: u64) {
        if let Some(key) = epoch_key {
            let hash = self.epochs.entry(Arc::clone(key)).or_default();
            hash.longest_ttl_ms = hash.longest_ttl_ms.max(ttl_ms);
        }
    }

    /// The probe's `HSETNX epoch id candidate` and `HMGET epoch id ttl`.
    fn epoch(&mut self, key: &Arc<str>, candidate: &Arc<str>) -> (Arc<str>, u64) {
        let hash = self.epochs.entry(Arc::clone(key)).or_default();
        let id = hash.id.get_or_insert_with(|| Arc::clone(candidate));
        (Arc::clone(id), hash.longest_ttl_ms)
    }

    /// The `FENCED_SET` and `FENCED_RETAKE` scripts: a grant, then `INCR fence`,
    /// whose answer reads as `RedisInstance` reads the scripts' (a counter
    /// someone set below zero: 0 reads as a refusal, -1 as a changed epoch,
    /// and the grant stays).
    fn fenced(&mut self, granted: Reply, fence: &Arc<str>, now: Duration) -> Counter {
        if !granted? {
            return Ok(0);
        }
        match self.incr(fence, now)? {
            -1 => Err(epoch::changed()),
            counter => u64::try_from(counter).map_err(|_| {
                RedisError::from((
                    ErrorKind::UnexpectedReturnType,
                    "unexpected reply",
                    format!("a script answered Int({counter})"),
                ))
            }),
        }
    }

    /// The `FENCE_WRITE_BACK` script.
    fn fence_write_back(
        &mut self,
        key: &str,
        fence: &Arc<str>,
        value: &str,
        token: u64,
        now: Duration,
    ) -> Reply {
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
    fn release(&mut self, key: &str, value: &str, now: Duration) -> Reply {
        match self.live(key, now) {
            Some(entry) if *entry.value == *value => {
                self.keys.remove(key);
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// Whether `held` is `token` alone or `token`, a space and metadata.
/// As the `RETAKE` script: the value starts with the token and a space.
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

/// What happened to a request when it reached the instance.
enum Arrival<T> {
    Answered(Result<T, RedisError>),
    Queued(oneshot::Receiver<Result<T, RedisError>>),
}

impl MemoryInstance {
    /// A new, empty, healthy instance called `name`, with no latency and a clock
    /// that starts at the system time and follows Tokio's clock at rate 1.
    ///
    /// The name shows in the locker's errors, and must differ from every other
    /// instance's name in one locker.
    pub fn new(name: impl Into<String>) -> Self {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Self {
            inner: Arc::new(Inner {
                name: name.into().into(),
                state: Mutex::new(State {
                    store: Store::new(),
                    clock: Clock {
                        anchor: Instant::now(),
                        at: started,
                        rate: 1.0,
                    },
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

    /// Sets the round trip of every operation started from now on: the request
    /// takes half of it to reach the instance, the reply the other half. A
    /// request whose future is dropped before it arrives is never applied, as
    /// one lost on the wire. Operations already started keep their latency.
    pub fn set_latency(&self, round_trip: Duration) {
        self.state().latency = round_trip;
    }

    /// The round trip set with [`set_latency`](Self::set_latency) (zero at first).
    pub fn latency(&self) -> Duration {
        self.state().latency
    }

    /// While `failing`, every request that arrives is answered with an error of
    /// kind [`redis::ErrorKind::Io`] (connection refused) after the usual latency,
    /// and not applied: the instance looks unreachable. This takes precedence over
    /// [`pause`](Self::pause); requests already waiting in a paused instance still
    /// apply at [`resume`](Self::resume).
    pub fn set_failing(&self, failing: bool) {
        self.state().failing = failing;
    }

    /// Whether the instance is failing.
    pub fn is_failing(&self) -> bool {
        self.state().failing
    }

    /// Stops the instance, as `SIGSTOP` stops a server: requests that arrive
    /// wait, unanswered, and are applied in arrival order at
    /// [`resume`](Self::resume) — even those whose caller stopped waiting, as the
    /// server has already read them. Keys still expire by the instance's clock.
    pub fn pause(&self) {
        self.state().paused = true;
    }

    /// Lets a paused instance run again; the requests that arrived meanwhile are
    /// applied before this returns, and their replies leave.
    pub fn resume(&self) {
        let mut state = self.state();
        state.paused = false;
        let now = state.clock.now();
        let queued = std::mem::take(&mut state.queued);
        state.commands += queued.iter().filter(|(counted, _)| *counted).count() as u64;
        for (_, request) in queued {
            request(&mut state.store, now);
        }
    }

    /// Whether the instance is paused.
    pub fn is_paused(&self) -> bool {
        self.state().paused
    }

    /// Restarts the instance without persistence: every key is forgotten and the
    /// run id (from `INFO server`) changes. Requests waiting in a paused instance
    /// fail as their connections would. Latency, failing, pause and the clock are
    /// unchanged.
    pub fn restart_empty(&self) {
        let mut state = self.state();
        state.store = Store::new();
        // Dropping the requests drops their reply channels: their callers see a
        // reset connection.
        state.queued.clear();
    }

    /// Makes the instance's clock run `rate` times as fast as Tokio's from now on
    /// (1.0 at first), without a jump. A key's TTL is counted on this clock, so at
    /// rate 2 a key set for 2 s is gone after 1 s of Tokio time: a server whose
    /// clock runs fast lets a lock go early, which the drift factor must cover.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when `rate` is not finite or not positive.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build()?.block_on(async {
    /// use std::time::Duration;
    /// use quorumlock::{MemoryInstance, QuorumLocker};
    ///
    /// let fast = MemoryInstance::new("fast");
    /// fast.set_clock_rate(2.0)?;
    /// let locker = QuorumLocker::builder().memory(&fast).build().await?;
    /// let _lock = locker.acquire("job", Duration::from_secs(2)).await?;
    ///
    /// // Time is paused: advancing it costs nothing.
    /// tokio::time::advance(Duration::from_millis(999)).await;
    /// assert!(fast.get("job").is_some());
    /// tokio::time::advance(Duration::from_millis(1)).await;
    /// assert_eq!(fast.get("job"), None);
    /// # Ok::<_, quorumlock::Error>(())
    /// # })?;
    /// # Ok(()) }
    /// ```
    pub fn set_clock_rate(&self, rate: f64) -> crate::Result<()> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(Error::InvalidConfig {
                setting: "clock_rate",
                reason: format!("{rate} is not a finite number above 0"),
            });
        }
        let mut state = self.state();
        state.clock = Clock {
            anchor: Instant::now(),
            at: state.clock.now(),
            rate,
        };
        Ok(())
    }

    /// The rate set with [`set_clock_rate`](Self::set_clock_rate).
    pub fn clock_rate(&self) -> f64 {
        self.state().clock.rate
    }

    /// The instance's clock, since the Unix epoch: what `TIME` would answer.
    pub fn now(&self) -> Duration {
        self.state().clock.now()
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
            let epoch = store.epochs.remove(key).is_some();
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

    /// Every release message published from now on, as `(channel, message)`.
    pub(crate) fn published(&self) -> broadcast::Receiver<(Arc<str>, Arc<str>)> {
        self.inner.published.subscribe()
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

    /// Sends `apply` as one request: it arrives after half the round trip, is
    /// applied (or refused, or queued while paused), and its answer comes back
    /// after the other half.
    fn run<T, F>(&self, apply: F) -> BoxFuture<Result<T, RedisError>>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store, Duration) -> Result<T, RedisError> + Send + 'static,
    {
        self.send(true, apply)
    }

    /// As `run`, for a request that is not a lock command (`counted` false).
    fn send<T, F>(&self, counted: bool, apply: F) -> BoxFuture<Result<T, RedisError>>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store, Duration) -> Result<T, RedisError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let round_trip = inner.state().latency;
        Box::pin(async move {
            let there = round_trip / 2;
            wait(there).await;
            let answer = match inner.arrive(counted, apply) {
                Arrival::Answered(answer) => answer,
                Arrival::Queued(reply) => reply.await.unwrap_or_else(|_| {
                    Err(io_error(
                        io::ErrorKind::ConnectionReset,
                        format!("memory instance {} restarted (simulated)", inner.name),
                    ))
                }),
            };
            wait(round_trip - there).await;
            answer
        })
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn arrive<T, F>(&self, counted: bool, apply: F) -> Arrival<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store, Duration) -> Result<T, RedisError> + Send + 'static,
    {
        let mut state = self.state();
        if state.failing {
            state.commands += u64::from(counted);
            return Arrival::Answered(Err(io_error(
                io::ErrorKind::ConnectionRefused,
                format!("memory instance {} is failing (simulated)", self.name),
            )));
        }
        if state.paused {
            let (reply, answer) = oneshot::channel();
            state.queued.push((
                counted,
                Box::new(move |store, now| {
                    // The caller may have stopped waiting; the request applies anyway.
                    let _ = reply.send(apply(store, now));
                }),
            ));
            return Arrival::Queued(answer);
        }
        state.commands += u64::from(counted);
        let now = state.clock.now();
        Arrival::Answered(apply(&mut state.store, now))
    }
}

async fn wait(delay: Duration) {
    // A zero-latency operation then completes in the poll that starts it.
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

fn io_error(kind: io::ErrorKind, message: String) -> RedisError {
    RedisError::from(io::Error::new(kind, message))
}

impl Instance for MemoryInstance {
    fn set_nx_px(
        &self,
        key: &Arc<str>,
        value: &Arc<str>,
        ttl_ms: u64,
        epoch: Option<&Epoch>,
    ) -> BoxFuture<Reply> {
        let (key, value, epoch) = (Arc::clone(key), Arc::clone(value), epoch.cloned());
        self.run(move |store, now| {
            store.checked(epoch.as_ref(), ttl_ms, |store| {
                store.set_nx_px(&key, &value, ttl_ms, now)
            })
        })
    }

    fn retake(
        &self,
        key: &Arc<str>,
        token: &Arc<str>,
        value: &Arc<str>,
        ttl_ms: u64,
        epoch: Option<&Epoch>,
    ) -> BoxFuture<Reply> {
        let (key, token, value) = (Arc::clone(key), Arc::clone(token), Arc::clone(value));
        let epoch = epoch.cloned();
        self.run(move |store, now| {
            store.checked(epoch.as_ref(), ttl_ms, |store| {
                store.retake(&key, &token, &value, ttl_ms, now)
            })
        })
    }

    fn extend(
        &self,
        key: &Arc<str>,
        value: &Arc<str>,
        ttl_ms: u64,
        epoch_key: Option<&Arc<str>>,
    ) -> BoxFuture<Reply> {
        let (key, value, epoch_key) = (Arc::clone(key), Arc::clone(value), epoch_key.cloned());
        self.run(move |store, now| {
            let extended = store.extend(&key, &value, ttl_ms, now)?;
            if extended {
                store.raise(epoch_key.as_ref(), ttl_ms);
            }
            Ok(extended)
        })
    }

    fn release(&self, key: &Arc<str>, value: &Arc<str>) -> BoxFuture<Reply> {
        let (key, value) = (Arc::clone(key), Arc::clone(value));
        self.run(move |store, now| store.release(&key, &value, now))
    }

    fn fenced_set(
        &self,
        key: &Arc<str>,
        fence: &Arc<str>,
        value: &Arc<str>,
        ttl_ms: u64,
        epoch: Option<&Epoch>,
    ) -> BoxFuture<Counter> {
        let (key, fence, value) = (Arc::clone(key), Arc::clone(fence), Arc::clone(value));
        let epoch = epoch.cloned();
        self.run(move |store, now| {
            let granted = store.checked(epoch.as_ref(), ttl_ms, |store| {
                store.set_nx_px(&key, &value, ttl_ms, now)
            });
            store.fenced(granted, &fence, now)
        })
    }

    fn fenced_retake(
        &self,
        key: &Arc<str>,
        fence: &Arc<str>,
        token: &Arc<str>,
        value: &Arc<str>,
        ttl_ms: u64,
        epoch: Option<&Epoch>,
    ) -> BoxFuture<Counter> {
        let (key, fence) = (Arc::clone(key), Arc::clone(fence));
        let (token, value, epoch) = (Arc::clone(token), Arc::clone(value), epoch.cloned());
        self.run(move |store, now| {
            let granted = store.checked(epoch.as_ref(), ttl_ms, |store| {
                store.retake(&key, &token, &value, ttl_ms, now)
            });
            store.fenced(granted, &fence, now)
        })
    }

    fn fence_write_back(
        &self,
        key: &Arc<str>,
        fence: &Arc<str>,
        value: &Arc<str>,
        token: u64,
    ) -> BoxFuture<Reply> {
        let (key, fence, value) = (Arc::clone(key), Arc::clone(fence), Arc::clone(value));
        self.run(move |store, now| store.fence_write_back(&key, &fence, &value, token, now))
    }

    fn release_publish(
        &self,
        key: &Arc<str>,
        value: &Arc<str>,
        channel: &Arc<str>,
        message: &Arc<str>,
    ) -> BoxFuture<Reply> {
        let (key, value) = (Arc::clone(key), Arc::clone(value));
        let published = (Arc::clone(channel), Arc::clone(message));
        let sender = self.inner.published.clone();
        self.run(move |store, now| {
            let released = store.release(&key, &value, now)?;
            if released {
                // No subscriber is not an error, as PUBLISH answers 0.
                let _ = sender.send(published);
            }
            Ok(released)
        })
    }

    fn pubsub(&self) -> Option<PubSubSource> {
        Some(PubSubSource::Memory(self.clone()))
    }

    fn load_scripts(&self) -> BoxFuture<Reply> {
        self.send(false, |_, _| Ok(true))
    }

    fn probe(
        &self,
        epoch_key: &Arc<str>,
        candidate: &Arc<str>,
    ) -> BoxFuture<Result<Probe, RedisError>> {
        let (epoch_key, candidate) = (Arc::clone(epoch_key), Arc::clone(candidate));
        self.send(false, move |store, now| {
            let (epoch, longest_ms) = store.epoch(&epoch_key, &candidate);
            Ok(Probe {
                run_id: store.run_id.clone(),
                server_time: now,
                epoch,
                longest_ttl: Duration::from_millis(longest_ms).min(crate::MAX_TTL),
            })
        })
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
            .field("clock_rate", &state.clock.rate)
            .field("latency", &state.latency)
            .field("paused", &state.paused)
            .field("failing", &state.failing)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "job";

    fn arc(text: &str) -> Arc<str> {
        text.into()
    }

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
        assert!(instance.load_scripts().await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn restart_empty_forgets_keys_and_changes_the_run_id() {
        let instance = MemoryInstance::new("m");
        let before = instance
            .probe(&arc("quorumlock:epoch"), &arc("e1"))
            .await
            .unwrap();
        assert_eq!(before.run_id.len(), 40);
        assert!(before.run_id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(
            instance
                .probe(&arc("quorumlock:epoch"), &arc("e1"))
                .await
                .unwrap()
                .run_id,
            before.run_id
        );

        instance.set(KEY, "v", None);
        instance.restart_empty();
        let after = instance
            .probe(&arc("quorumlock:epoch"), &arc("e1"))
            .await
            .unwrap();
        assert_ne!(after.run_id, before.run_id);
        assert_eq!(after.run_id.len(), 40);
        assert!(instance.keys().is_empty());
        assert_ne!(
            MemoryInstance::new("n")
                .probe(&arc("quorumlock:epoch"), &arc("e1"))
                .await
                .unwrap()
                .run_id,
            after.run_id
        );
    }

    #[tokio::test(start_paused = true)]
    async fn probe_reads_the_scaled_clock() {
        let instance = MemoryInstance::new("m");
        let start = instance
            .probe(&arc("quorumlock:epoch"), &arc("e1"))
            .await
            .unwrap()
            .server_time;
        instance.set_clock_rate(3.0).unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        let later = instance
            .probe(&arc("quorumlock:epoch"), &arc("e1"))
            .await
            .unwrap()
            .server_time;
        assert_eq!(later - start, Duration::from_secs(6));
        assert_eq!(instance.now(), later);
    }

    #[tokio::test(start_paused = true)]
    async fn restart_fails_requests_waiting_in_a_paused_instance() {
        let instance = MemoryInstance::new("m");
        instance.pause();
        let waiting = tokio::spawn(instance.set_nx_px(&arc(KEY), &arc("v"), 1000, None));
        tokio::task::yield_now().await;
        instance.restart_empty();
        let err = waiting.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Io);
        instance.resume();
        assert_eq!(instance.get(KEY), None);
        assert_eq!(instance.commands(), 0);
    }

    /// The request lands after half the round trip and the reply after the other
    /// half; a request dropped on the way never lands.
    #[tokio::test(start_paused = true)]
    async fn latency_splits_into_request_and_reply() {
        let instance = MemoryInstance::new("m");
        instance.set_latency(Duration::from_millis(100));
        let start = Instant::now();
        let mut set = instance.set_nx_px(&arc(KEY), &arc("v"), 1000, None);
        let early = tokio::time::timeout(Duration::from_millis(49), &mut set).await;
        assert!(early.is_err());
        assert_eq!(instance.get(KEY), None);
        let landed = tokio::time::timeout(Duration::from_millis(2), &mut set).await;
        assert!(landed.is_err(), "the reply is still on its way");
        assert_eq!(instance.get(KEY).as_deref(), Some("v"));
        assert!(set.await.unwrap());
        assert_eq!(start.elapsed(), Duration::from_millis(100));

        // The latency is read when an operation starts.
        let release = instance.release(&arc(KEY), &arc("v"));
        instance.set_latency(Duration::ZERO);
        assert!(release.await.unwrap());
        assert_eq!(start.elapsed(), Duration::from_millis(200));

        instance.set_latency(Duration::from_millis(100));
        let lost = instance.set_nx_px(&arc(KEY), &arc("lost"), 1000, None);
        assert!(tokio::time::timeout(Duration::from_millis(49), lost)
            .await
            .is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(instance.get(KEY), None);
        assert_eq!(instance.commands(), 2);
    }

    /// A paused instance applies what reached it only on resume, in arrival
    /// order, even where the caller stopped waiting.
    #[tokio::test(start_paused = true)]
    async fn a_paused_instance_queues_requests_until_resumed() {
        let instance = MemoryInstance::new("m");
        instance.pause();
        let first = tokio::spawn(instance.set_nx_px(&arc(KEY), &arc("first"), 1000, None));
        let abandoned = instance.set_nx_px(&arc("other"), &arc("v"), 1000, None);
        assert!(tokio::time::timeout(Duration::from_secs(5), abandoned)
            .await
            .is_err());
        let second = tokio::spawn(instance.set_nx_px(&arc(KEY), &arc("second"), 1000, None));
        tokio::task::yield_now().await;
        assert!(instance.keys().is_empty());
        assert_eq!(instance.commands(), 0);
        assert!(!first.is_finished());

        instance.resume();
        assert_eq!(instance.keys(), ["job", "other"]);
        assert_eq!(instance.get(KEY).as_deref(), Some("first"));
        assert!(first.await.unwrap().unwrap());
        assert!(!second.await.unwrap().unwrap());
        assert_eq!(instance.commands(), 3);
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

    #[test]
    fn futures_are_send_and_static() {
        fn send_static<T: Send + 'static>(_: T) {}
        let instance = MemoryInstance::new("m");
        send_static(instance.set_nx_px(&arc(KEY), &arc("v"), 1, None));
        send_static(instance.clone());
    }
}
