//! The locker, the public front: N instances in order, a quorum, and the
//! calls that take locks and report on the instances.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::builder::Builder;
use crate::error::Error;
use crate::health::{self, Health};
use crate::inspect::{self, Inspection};
use crate::instance::connect::CHECK_TIMEOUT;
use crate::instance::PubSubSource;
use crate::lock::Lock;
use crate::monitor::probe::ensure_running;
use crate::request::LockRequest;
use crate::shared::Shared;
use crate::status::LockStatus;

/// Distributed locks over N Redis instances with the Redlock quorum algorithm.
///
/// Build one with [`QuorumLocker::builder`]; clone it freely (clones share the
/// connections). See the [crate docs](crate) for the algorithm and its assumptions.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::time::Duration;
/// use quorumlock::{MemoryInstance, QuorumLocker};
///
/// let redis = MemoryInstance::new("redis");
/// let locker = QuorumLocker::builder().memory(&redis).build().await?;
/// let lock = locker.acquire("nightly-report", Duration::from_secs(30)).await?;
/// assert_eq!(redis.get("nightly-report").as_deref().map(|v| v.starts_with(lock.token())), Some(true));
/// lock.release().await?;
/// assert_eq!(redis.get("nightly-report"), None);
/// # Ok::<_, quorumlock::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
#[doc(alias = "mutex", alias = "redlock", alias = "LockManager")]
pub struct QuorumLocker {
    shared: Arc<Shared>,
}

impl QuorumLocker {
    /// Starts building a locker.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> quorumlock::Result<()> {
    /// use std::time::Duration;
    /// use quorumlock::QuorumLocker;
    ///
    /// let locker = QuorumLocker::builder()
    ///     .urls(["redis://10.0.0.1", "redis://10.0.0.2", "redis://10.0.0.3"])
    ///     .key_prefix("locks:")
    ///     .instance_timeout(Duration::from_millis(20))
    ///     .build()
    ///     .await?;
    /// assert_eq!(locker.quorum(), 2);
    /// # Ok(()) }
    /// ```
    pub fn builder() -> Builder {
        Builder::new()
    }

    /// Wraps the shared state and starts the instance monitor, which ends when the
    /// last clone of the locker (and every lock) is dropped.
    /// What the locker shares with its locks.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub(crate) fn start(shared: Shared) -> Self {
        let shared = Arc::new(shared);
        ensure_running(&shared);
        Self { shared }
    }

    /// Takes `key` for `ttl`, retrying with randomised delays (the
    /// [`RetryPolicy`](crate::RetryPolicy)) until the acquire timeout. For a caller-chosen token,
    /// metadata or a different wait, use [`lock`](Self::lock).
    ///
    /// Each attempt sends `SET key token NX PX ttl` to every instance at once and
    /// is decided at the quorum-th grant (or once a quorum is out of reach); a lost
    /// attempt is rolled back on every instance that may hold its token.
    ///
    /// # Errors
    ///
    /// - [`Error::NotAcquired`] when the timeout or the attempt limit is reached;
    ///   it carries every instance's vote in the last attempt;
    /// - [`Error::EmptyKey`], [`Error::ReservedKey`] or [`Error::InvalidTtl`] for bad input,
    ///   before any I/O.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future at any point leaves no key with its token behind: the
    /// attempt in flight is rolled back in the background.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use quorumlock::{MemoryInstance, QuorumLocker};
    ///
    /// let redis = MemoryInstance::new("redis");
    /// let locker = QuorumLocker::builder().memory(&redis).build().await?;
    /// let lock = locker.acquire("refill-cache", Duration::from_secs(10)).await?;
    /// assert!(lock.remaining() > Duration::from_secs(9));
    /// lock.release().await?;
    /// # Ok::<_, quorumlock::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn acquire(&self, key: &str, ttl: Duration) -> crate::Result<Lock> {
        self.lock(key).ttl(ttl).acquire().await
    }

    /// Makes exactly one attempt to take `key` for `ttl`.
    ///
    /// # Errors
    ///
    /// As [`acquire`](Self::acquire), after one attempt.
    ///
    /// # Cancel safety
    ///
    /// As [`acquire`](Self::acquire): a dropped attempt is rolled back.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use quorumlock::{MemoryInstance, QuorumLocker};
    ///
    /// let redis = MemoryInstance::new("redis");
    /// let locker = QuorumLocker::builder().memory(&redis).build().await?;
    /// let first = locker.try_acquire("cron", Duration::from_secs(60)).await?;
    /// // Held: a second attempt fails at once instead of waiting.
    /// let second = locker.try_acquire("cron", Duration::from_secs(60)).await;
    /// assert!(matches!(second, Err(quorumlock::Error::NotAcquired { .. })));
    /// first.release().await?;
    /// # Ok::<_, quorumlock::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn try_acquire(&self, key: &str, ttl: Duration) -> crate::Result<Lock> {
        self.lock(key).ttl(ttl).try_acquire().await
    }

    /// Takes `key` (waiting as [`acquire`](Self::acquire) does), runs `work` while a
    /// watchdog extends the lock every third of `ttl`, and releases the lock when
    /// the work ends — also when it returns an error or panics (the panic then
    /// continues, after the release).
    ///
    /// `work` receives a [`LockStatus`] for the lock. If the lock is lost while the
    /// work runs — a quorum of instances no longer hold it, or the validity ran out
    /// because extends could not get through — the work's future is dropped at its
    /// next await point (Rust's cancellation) and `with_lock` returns
    /// [`Error::LockLost`]. Work that runs long stretches without awaiting should
    /// check [`LockStatus::is_valid`] itself, and work with side effects that must
    /// not be cut short should `select!` on [`LockStatus::lost`] and stop cleanly.
    ///
    /// ```no_run
    /// # async fn demo(locker: quorumlock::QuorumLocker) -> quorumlock::Result<()> {
    /// use std::time::Duration;
    ///
    /// let rows = locker
    ///     .with_lock("refill-cache", Duration::from_secs(10), |status| async move {
    ///         // ... the expensive work; `status.lost()` resolves if the lock goes ...
    ///         42
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`acquire`](Self::acquire) before the work starts; [`Error::LockLost`]
    /// when the work was cancelled because the lock was lost. A failed release
    /// after the work finished is logged, not returned: the work's result is
    /// worth more, and the keys expire by their TTL.
    #[doc(alias = "using")]
    pub async fn with_lock<F, Fut, T>(&self, key: &str, ttl: Duration, work: F) -> crate::Result<T>
    where
        F: FnOnce(LockStatus) -> Fut,
        Fut: Future<Output = T>,
    {
        self.lock(key).ttl(ttl).with_lock(work).await
    }

    /// Starts a lock request for `key` with per-call options: TTL, your own token,
    /// metadata, how long to wait, the auto-extend interval.
    pub fn lock(&self, key: impl Into<String>) -> LockRequest<'_> {
        LockRequest::new(&self.shared, key.into())
    }

    /// Connects to every instance, loads the Lua scripts there, waits for the
    /// first measurements of each instance's identity and clock (about 85 ms:
    /// an instance votes only once they are in), and reports each instance's
    /// health. The first lock then pays for none of these.
    ///
    /// Locks work without it: connections open on first use, scripts load on a
    /// `NOSCRIPT` answer, and a new locker's first attempt waits for the
    /// measurements. Its value is the early, clear failure at start-up.
    ///
    /// # Errors
    ///
    /// - [`Error::Unavailable`] when fewer than a quorum of instances are ready;
    ///   its causes say what each answered;
    /// - [`Error::DuplicateInstance`] when two instances are the same server under
    ///   different addresses (their `run_id`s match): its vote would count twice.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use quorumlock::{MemoryInstance, QuorumLocker};
    ///
    /// let redis = MemoryInstance::new("redis");
    /// let locker = QuorumLocker::builder().memory(&redis).build().await?;
    /// let health = locker.prepare().await?; // fails early if no quorum is ready
    /// assert_eq!(health.reachable(), 1);
    /// # Ok::<_, quorumlock::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn prepare(&self) -> crate::Result<Health> {
        let health = self.check_health(true).await;
        // The first measurements every instance needs before it votes; without
        // this the first acquire waits for them.
        ensure_running(&self.shared);
        self.shared.monitor.warmed_up().await;
        if !health.has_quorum() {
            return Err(Error::Unavailable {
                operation: "prepare",
                key: String::new(),
                causes: health.votes(),
            });
        }
        if let Some((first, second)) = health.same_server() {
            return Err(Error::DuplicateInstance {
                first,
                second,
                address: self.shared.members[second].address.to_string(),
            });
        }
        Ok(health)
    }

    /// Asks every instance, in parallel, for its `run_id` and clock, and reports
    /// whether it answered and how fast. Never fails: an unreachable instance is
    /// part of the report.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use quorumlock::{MemoryInstance, QuorumLocker};
    ///
    /// let (a, b, c) = (MemoryInstance::new("a"), MemoryInstance::new("b"), MemoryInstance::new("c"));
    /// let locker = QuorumLocker::builder().memory(&a).memory(&b).memory(&c).build().await?;
    /// c.set_failing(true);
    /// let health = locker.health().await;
    /// assert_eq!(health.reachable(), 2);
    /// assert!(health.has_quorum());
    /// assert!(!health.instances()[2].is_reachable());
    /// println!("{health}"); // one line per instance: latency, run_id, clock offset
    /// # Ok::<_, quorumlock::Error>(())
    /// # }).unwrap();
    /// ```
    #[doc(alias = "ping")]
    pub async fn health(&self) -> Health {
        self.check_health(false).await
    }

    async fn check_health(&self, load_scripts: bool) -> Health {
        // The check may include connecting: allow a connection's worth of time.
        let timeout = self.shared.settings.instance_timeout.max(CHECK_TIMEOUT);
        health::check(&self.shared, timeout, load_scripts).await
    }

    /// Reads what `key` holds on every instance, in parallel: each instance's
    /// holder (token and metadata) and TTL left, and whether a quorum holds
    /// one token. Read-only, and not a lock operation: an instance that is
    /// quarantined or slow is read all the same (each within about a second).
    ///
    /// # Errors
    ///
    /// [`Error::EmptyKey`] or [`Error::ReservedKey`] for a key no lock can
    /// have, before any I/O. An instance that does not answer is part of the
    /// report, not an error.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
    ///
    /// # Examples
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use quorumlock::{MemoryInstance, QuorumLocker};
    ///
    /// let redis = MemoryInstance::new("redis");
    /// let locker = QuorumLocker::builder().memory(&redis).build().await?;
    /// assert_eq!(locker.inspect("cron").await?.holder(), None);
    /// let lock = locker.acquire("cron", Duration::from_secs(10)).await?;
    /// assert_eq!(locker.inspect("cron").await?.holder(), Some(lock.token()));
    /// # Ok::<_, quorumlock::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn inspect(&self, key: &str) -> crate::Result<Inspection> {
        let lock_key = self.shared.lock_key(key)?;
        Ok(inspect::inspect(&self.shared, key, &lock_key.redis).await)
    }

    /// An administrator's tool: deletes `key` on every instance, whoever holds
    /// it, and returns how many instances deleted it. The holder is not told:
    /// it goes on believing it holds the lock until its validity runs out, so a
    /// second owner may take the key meanwhile. For a lock whose holder is
    /// known to be gone (a crashed process with a long TTL), never in normal
    /// operation. Each instance deletes only the value it was just read to
    /// hold (compare-and-delete), so a lock taken in between is left alone.
    ///
    /// # Errors
    ///
    /// As [`inspect`](Self::inspect). Instances that do not answer are not
    /// errors: they are left out of the count.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may leave some instances deleted and others not:
    /// call it again.
    ///
    /// # Examples
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use quorumlock::{MemoryInstance, QuorumLocker};
    ///
    /// let redis = MemoryInstance::new("redis");
    /// let locker = QuorumLocker::builder().memory(&redis).build().await?;
    /// let stuck = locker.acquire("migration", Duration::from_secs(3600)).await?;
    /// stuck.leave_to_expire(); // its process is gone
    /// assert_eq!(locker.force_release("migration").await?, 1);
    /// assert!(locker.try_acquire("migration", Duration::from_secs(10)).await.is_ok());
    /// # Ok::<_, quorumlock::Error>(())
    /// # }).unwrap();
    /// ```
    #[doc(alias = "force_unlock")]
    pub async fn force_release(&self, key: &str) -> crate::Result<usize> {
        let lock_key = self.shared.lock_key(key)?;
        let seen = inspect::inspect(&self.shared, key, &lock_key.redis).await;
        Ok(inspect::force_release(&self.shared, &seen, &lock_key.redis).await)
    }

    /// Waits until the background work this locker started has finished: rollbacks
    /// of lost or dropped attempts, releases of dropped locks, and requests still
    /// in flight after a call returned. Useful before shutting down, and in tests.
    ///
    /// Work waiting on a stalled instance gives up only when the keys it concerns
    /// would have expired anyway (after their TTL), so with an instance stopped
    /// this can take up to the longest TTL in use; bound it with
    /// `tokio::time::timeout` when that matters. Auto-extend watchdogs are not
    /// background work: they end with their guards.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use quorumlock::{MemoryInstance, QuorumLocker};
    ///
    /// let redis = MemoryInstance::new("redis");
    /// let locker = QuorumLocker::builder().memory(&redis).build().await?;
    /// let lock = locker.acquire("job", Duration::from_secs(10)).await?;
    /// drop(lock); // released in the background
    /// locker.settle().await;
    /// assert_eq!(redis.get("job"), None);
    /// # Ok::<_, quorumlock::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn settle(&self) {
        self.shared.background.idle().await;
    }

    /// The number of instances.
    pub fn instances(&self) -> usize {
        self.shared.members.len()
    }

    /// The number of instances that must grant a lock.
    pub fn quorum(&self) -> usize {
        self.shared.quorum
    }

    /// The instances' addresses (passwords redacted) or names, in order.
    pub fn addresses(&self) -> impl Iterator<Item = &str> {
        self.shared.members.iter().map(|member| &*member.address)
    }

    /// A redis-rs client for URL instance `index`, made as the locker's own
    /// (TLS settings included), for commands of your own on a connection of
    /// their own: inspection, tooling. `None` for instances given as a
    /// connection or a memory instance, and out of range.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let cluster = quorumlock::testing::RedisCluster::start(1)?;
    /// # let url = cluster.urls().remove(0);
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// use quorumlock::QuorumLocker;
    ///
    /// let locker = QuorumLocker::builder().url(url).build().await?;
    /// let client = locker.redis_client(0).expect("a URL instance");
    /// let mut connection = client.get_multiplexed_async_connection().await?;
    /// let pong: String = redis::cmd("PING").query_async(&mut connection).await?;
    /// assert_eq!(pong, "PONG");
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// # })?;
    /// # Ok(()) }
    /// ```
    pub fn redis_client(&self, index: usize) -> Option<redis::Client> {
        match self.shared.members.get(index)?.instance.pubsub()? {
            PubSubSource::Redis(client) => Some(*client),
            PubSubSource::InProcess(_) | PubSubSource::Resolved(_) => None,
        }
    }

    /// The TTL set with [`Builder::default_ttl`], for callers that do not choose
    /// one per lock.
    pub fn default_ttl(&self) -> Duration {
        self.shared.settings.default_ttl
    }
}

impl std::fmt::Debug for QuorumLocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuorumLocker")
            .field("instances", &self.addresses().collect::<Vec<_>>())
            .field("quorum", &self.shared.quorum)
            .field("settings", &self.shared.settings)
            .finish()
    }
}
