//! The locker: N instances in order, a quorum, and the acquire loop.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::acquire::{self, Identity, Outcome};
use crate::background::Background;
use crate::builder::{Builder, CHECK_TIMEOUT};
use crate::epoch::EPOCH_KEY;
use crate::error::Error;
use crate::handoff::{self, Handoff};
use crate::health::{self, Health};
use crate::instance::{Member, PubSubSource};
use crate::lock::Lock;
use crate::monitor::{Monitor, Policy};
use crate::quorum;
use crate::request::LockRequest;
use crate::retry::RetryPolicy;
use crate::status::LockStatus;

/// The largest TTL accepted: `2³² − 1` seconds, about 136 years. Far below what
/// `PX` (milliseconds in a signed 64-bit count from the epoch) allows, and far from
/// any overflow in instant arithmetic.
pub const MAX_TTL: Duration = Duration::from_secs(u32::MAX as u64);

/// Distributed locks over N Redis instances with the Redlock quorum algorithm.
///
/// Build one with [`QuorumLocker::builder`]; clone it freely (clones share the
/// connections). See the [crate docs](crate) for the algorithm and its assumptions.
#[derive(Clone)]
pub struct QuorumLocker {
    shared: Arc<Shared>,
}

/// What a locker and its locks share.
pub(crate) struct Shared {
    pub(crate) members: Vec<Member>,
    pub(crate) quorum: usize,
    pub(crate) settings: Settings,
    pub(crate) background: Background,
    /// Wakes waits at releases, with `Builder::wake_waiters`.
    pub(crate) handoff: Option<Handoff>,
    /// The task that probes the instances.
    pub(crate) monitor: Monitor,
    /// The longest TTL this locker has sent, in milliseconds: a restarted
    /// instance may have held a lock that long.
    pub(crate) longest_ttl_ms: AtomicU64,
}

impl Shared {
    /// Notes a TTL about to be sent to the instances.
    pub(crate) fn note_ttl(&self, ttl: Duration) {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        self.longest_ttl_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// How long an instance that lost its keys may not vote: the configured
    /// quarantine, or the longest TTL any locker has set on these servers where
    /// that is longer (zero when the check is off).
    pub(crate) fn restart_quarantine(&self) -> Duration {
        let configured = self.settings.policy.restart_quarantine;
        if configured.is_zero() {
            return Duration::ZERO;
        }
        // Ours, and every other locker's as the servers keep it (the restarted
        // one has lost its own count; the others have theirs).
        let ours = Duration::from_millis(self.longest_ttl_ms.load(Ordering::Relaxed));
        let theirs = self
            .members
            .iter()
            .map(|member| member.state.longest_ttl())
            .max()
            .unwrap_or_default();
        configured.max(ours).max(theirs)
    }
}

/// The builder's settings, validated.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) default_ttl: Duration,
    pub(crate) drift_factor: f64,
    pub(crate) instance_timeout: Duration,
    pub(crate) retry: RetryPolicy,
    pub(crate) acquire_timeout: Duration,
    pub(crate) key_prefix: String,
    /// The key prefix followed by [`EPOCH_KEY`].
    pub(crate) epoch_key: Arc<str>,
    pub(crate) policy: Policy,
}

/// A key as the caller gave it, and as stored in Redis (with the prefix).
#[derive(Debug, Clone)]
pub(crate) struct LockKey {
    pub(crate) user: Arc<str>,
    pub(crate) redis: Arc<str>,
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

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Wraps the shared state and starts the instance monitor, which ends when the
    /// last clone of the locker (and every lock) is dropped.
    pub(crate) fn start(shared: Shared) -> Self {
        let shared = Arc::new(shared);
        shared.monitor.ensure_running(&shared);
        Self { shared }
    }

    /// Takes `key` for `ttl`, retrying with randomised delays (the
    /// [`RetryPolicy`]) until the acquire timeout. For a caller-chosen token,
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
    pub async fn with_lock<F, Fut, T>(&self, key: &str, ttl: Duration, work: F) -> crate::Result<T>
    where
        F: FnOnce(LockStatus) -> Fut,
        Fut: Future<Output = T>,
    {
        self.lock(key).ttl(ttl).run(work).await
    }

    /// Starts a lock request for `key` with per-call options: TTL, your own token,
    /// metadata, how long to wait, the auto-extend interval.
    pub fn lock(&self, key: impl Into<String>) -> LockRequest<'_> {
        LockRequest::new(self, key.into())
    }

    /// The attempt loop behind every acquire.
    pub(crate) async fn acquire_loop(
        &self,
        request: &LockRequest<'_>,
        wait: Duration,
        retry: RetryPolicy,
    ) -> crate::Result<Lock> {
        let key = self.lock_key(request.key(), request.ttl)?;
        request.validate()?;
        let identity = Identity {
            token: request.token.as_deref().map(Arc::from),
            metadata: request.metadata.as_deref().map(Arc::from),
            fenced: request.fenced,
        };
        let deadline = Instant::now().checked_add(wait);
        let handoff = self.shared.handoff.as_ref();
        let mut pacing = handoff::Pacing::new();
        let mut woken = false;
        let mut watch: Option<handoff::Watch> = None;
        let mut attempts = 0u32;
        loop {
            attempts = attempts.saturating_add(1);
            // A new acquire of a key we just released: let woken waiters
            // (elsewhere) try first.
            let courtesy = handoff
                .filter(|_| attempts == 1)
                .and_then(|handoff| handoff.courtesy_until(&key.redis));
            if let Some(until) = courtesy {
                tokio::time::sleep_until(until).await;
            }
            let seen = match (&mut watch, handoff) {
                (Some(watch), _) => {
                    watch.mark();
                    None
                }
                (None, Some(handoff)) if retry.delay(attempts).is_some() => {
                    handoff.peek(&key.redis)
                }
                _ => None,
            };
            let attempt =
                acquire::attempt(&self.shared, &key, request.ttl, &identity, attempts).await?;
            let (shortfall, causes) = match attempt {
                Outcome::Won(lock) => return Ok(lock),
                Outcome::Lost { shortfall, causes } => (shortfall, causes),
            };
            if std::mem::take(&mut woken) {
                pacing.lost();
            }
            let retry_at = retry
                .delay(attempts)
                .and_then(|delay| Instant::now().checked_add(delay))
                .filter(|at| deadline.is_none_or(|deadline| *at < deadline));
            let Some(retry_at) = retry_at else {
                return Err(Error::NotAcquired {
                    key: key.user.to_string(),
                    attempts,
                    shortfall,
                    causes,
                });
            };
            if watch.is_none() {
                watch = handoff.map(|handoff| handoff.watch(&key.redis, seen));
            }
            let Some(watch) = &mut watch else {
                tokio::time::sleep_until(retry_at).await;
                continue;
            };
            tokio::select! {
                () = tokio::time::sleep_until(retry_at) => {}
                () = watch.woken() => {
                    // A random pause, shorter the longer we have waited: long
                    // waits go first, and a woken crowd does not split the votes.
                    woken = true;
                    let pause = pacing.pause();
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
            }
        }
    }

    /// Releases `lock`; the same as [`Lock::release`].
    ///
    /// # Errors
    ///
    /// As [`Lock::release`].
    pub async fn release(&self, lock: Lock) -> crate::Result<usize> {
        lock.release().await
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
    pub async fn prepare(&self) -> crate::Result<Health> {
        let health = self.check_health(true).await;
        // The first measurements every instance needs before it votes; without
        // this the first acquire waits for them.
        self.shared.monitor.ensure_running(&self.shared);
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
    pub async fn health(&self) -> Health {
        self.check_health(false).await
    }

    async fn check_health(&self, load_scripts: bool) -> Health {
        // The check may include connecting: allow a connection's worth of time.
        let timeout = self.shared.settings.instance_timeout.max(CHECK_TIMEOUT);
        health::check(&self.shared, timeout, load_scripts).await
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
            PubSubSource::Memory(_) => None,
        }
    }

    /// The TTL set with [`Builder::default_ttl`], for callers that do not choose
    /// one per lock.
    pub fn default_ttl(&self) -> Duration {
        self.shared.settings.default_ttl
    }

    /// Validates a key and TTL before any I/O.
    fn lock_key(&self, key: &str, ttl: Duration) -> crate::Result<LockKey> {
        if key.is_empty() {
            return Err(Error::EmptyKey);
        }
        check_ttl(ttl, self.shared.settings.drift_factor)?;
        let redis = format!("{}{key}", self.shared.settings.key_prefix);
        // Under any prefix: another locker's epoch hash may live there.
        if redis.ends_with(EPOCH_KEY) {
            return Err(Error::ReservedKey {
                key: key.to_string(),
            });
        }
        Ok(LockKey {
            user: key.into(),
            redis: redis.into(),
        })
    }
}

/// A TTL must be at least one millisecond, at most [`MAX_TTL`], and longer than its
/// drift allowance (or no attempt could ever be valid). `PX` counts whole
/// milliseconds, so a fraction is dropped before these checks, as the attempt
/// drops it.
pub(crate) fn check_ttl(ttl: Duration, drift_factor: f64) -> crate::Result<()> {
    let invalid = |reason| Err(Error::InvalidTtl { ttl, reason });
    if ttl > MAX_TTL {
        return invalid("longer than quorumlock::MAX_TTL");
    }
    let whole = Duration::from_millis(ttl.as_millis() as u64);
    if whole.is_zero() {
        return invalid("shorter than the 1 ms resolution of PX");
    }
    if whole <= quorum::drift(whole, drift_factor) {
        return invalid("not longer than its clock-drift allowance (ttl × drift factor + 2 ms)");
    }
    Ok(())
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
