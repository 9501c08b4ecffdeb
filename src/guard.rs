//! The auto-extend watchdog and the guard that owns it.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::error::Error;
use crate::lease::default_extend_every;
use crate::lock::Lock;
use crate::metrics;
use crate::ops::extend;
use crate::ops::held::Held;
use crate::shared::Shared;
use crate::status::LockStatus;

/// A lock kept alive by a watchdog task that extends it while the guard lives.
///
/// Made by [`Lock::auto_extend`] (and used by
/// [`QuorumLocker::with_lock`](crate::QuorumLocker::with_lock)). Every interval
/// (a third of the TTL by default) the watchdog extends the lock by its TTL. An
/// extend that fails because instances did not answer is retried while validity is
/// left; once the lock is lost — a quorum of instances no longer hold the token, or
/// the validity ran out — the watchdog stops and [`lost`](LockStatus::lost) resolves.
///
/// Dropping the guard stops the watchdog and releases the lock in the background;
/// [`release`](Self::release) does it in the foreground. A guard dereferences
/// to its [`LockStatus`] (`guard.key()`, `guard.remaining()`, `guard.lost()`,
/// …), as a [`Lock`] does.
///
/// ```no_run
/// # async fn demo(locker: quorumlock::QuorumLocker) -> quorumlock::Result<()> {
/// use std::time::Duration;
///
/// let guard = locker.acquire("reindex", Duration::from_secs(30)).await?.auto_extend()?;
/// tokio::select! {
///     () = guard.lost() => eprintln!("lost the lock; stopping"),
///     () = reindex() => {}
/// }
/// guard.release().await?;
/// # Ok(()) }
/// # async fn reindex() {}
/// ```
#[must_use = "dropping the guard releases the lock at once"]
#[doc(alias = "watchdog")]
pub struct LockGuard {
    lock: Lock,
    /// Dropped to stop the watchdog.
    _stop: oneshot::Sender<()>,
}

impl LockGuard {
    /// Starts the watchdog: an extend every `every`, none due at or after
    /// `hold_until` (then the lock lapses at the end of its validity).
    pub(crate) fn start(
        lock: Lock,
        every: Duration,
        hold_until: Option<Instant>,
    ) -> crate::Result<Self> {
        lock.held().lease().check_interval(every)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let (stop, stopped) = oneshot::channel();
        let watchdog = watchdog(
            Arc::clone(lock.shared()),
            Arc::clone(lock.held()),
            every,
            hold_until,
            stopped,
        );
        // Not counted as background work: it lives as long as the guard, and
        // `settle` must not wait for that.
        runtime.spawn(watchdog);
        Ok(Self { lock, _stop: stop })
    }

    /// A cloneable view of the lock, to move into another task: the same
    /// methods this guard dereferences to.
    pub fn status(&self) -> LockStatus {
        self.lock.status()
    }

    /// Why the lock was lost, when a failed extend is the reason; taken once.
    pub(crate) fn take_loss(&self) -> Option<Error> {
        self.lock.held().take_loss()
    }

    /// Stops the watchdog and releases the lock; see [`Lock::release`].
    ///
    /// # Errors
    ///
    /// As [`Lock::release`].
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use quorumlock::{MemoryInstance, QuorumLocker};
    ///
    /// let redis = MemoryInstance::new("redis");
    /// let locker = QuorumLocker::builder().memory(&redis).build().await?;
    /// let guard = locker.acquire("reindex", Duration::from_secs(3)).await?.auto_extend()?;
    /// assert!(guard.is_valid());
    /// guard.release().await?;
    /// assert_eq!(redis.get("reindex"), None);
    /// # Ok::<_, quorumlock::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn release(self) -> crate::Result<usize> {
        let Self { lock, _stop } = self;
        drop(_stop);
        lock.release().await
    }
}

impl Deref for LockGuard {
    type Target = LockStatus;

    fn deref(&self) -> &LockStatus {
        &self.lock
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("LockGuard").field(&self.lock).finish()
    }
}

/// Extends the lock every `every` until stopped, lost, or `hold_until`. Each
/// extend is scheduled from the start of the last successful one, since that is
/// where its validity is counted from.
async fn watchdog(
    shared: Arc<Shared>,
    held: Arc<Held>,
    every: Duration,
    hold_until: Option<Instant>,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut next = due(held.acquired_at, held.valid_until(), every);
    loop {
        if hold_until.is_some_and(|until| next >= until) {
            // A holder that never finishes must not keep the lock for ever:
            // no more extends, and the lock lapses with its validity.
            warn!(key = %held.key.user, left = ?held.remaining(), "the lock's longest hold is reached: no more extends");
            return;
        }
        tokio::select! {
            _ = &mut stopped => return,
            () = held.lost() => return,
            () = tokio::time::sleep_until(next) => {}
        }
        let started = Instant::now();
        let ttl = held.ttl();
        let outcome = tokio::select! {
            _ = &mut stopped => return,
            outcome = extend::try_extend(&shared, &held, ttl) => outcome,
        };
        match outcome {
            Ok(_) => next = due(started, held.valid_until(), every),
            Err(failure) => {
                // A round that heard too little proves nothing while validity is
                // left; try again soon, but never past the validity.
                let retry_at = Instant::now() + retry_pause(&shared, every);
                if !failure.certain && retry_at < held.valid_until() {
                    if held.is_at_risk() {
                        debug!(key = %held.key.user, error = %failure.error, "extend inconclusive; retrying");
                    } else {
                        warn!(key = %held.key.user, error = %failure.error, left = ?held.remaining(), "extend inconclusive: the lock is at risk; retrying");
                    }
                    held.warn_at_risk();
                    next = retry_at;
                    continue;
                }
                warn!(key = %held.key.user, error = %failure.error, "lock lost: the watchdog could not extend it");
                metrics::lost("watchdog");
                held.lose(Some(failure.error));
                return;
            }
        }
    }
}

/// When the next extend is due after a round that started at `started` and
/// left the lock valid until `valid_until`: after `every`, or at half the
/// validity where that comes first. Fast server clocks can leave less validity
/// than the interval: extending on the interval alone would lose a lock no one
/// else took.
fn due(started: Instant, valid_until: Instant, every: Duration) -> Instant {
    let half = valid_until.saturating_duration_since(started) / 2;
    started + every.min(half)
}

/// The pause before retrying an inconclusive extend: long enough for a blip to
/// pass, short next to the interval.
fn retry_pause(shared: &Shared, every: Duration) -> Duration {
    (every / 10).max(shared.settings.instance_timeout)
}

// Defined here rather than in `lock`: the guard is built on the lock, and the
// lock knows nothing of its watchdog.
impl Lock {
    /// Hands the lock to a watchdog that extends it by its TTL every third of the
    /// TTL while the returned guard lives; see [`LockGuard`].
    ///
    /// # Errors
    ///
    /// [`Error::NoRuntime`](crate::Error::NoRuntime) outside a Tokio runtime (the watchdog needs one).
    #[doc(alias = "watchdog", alias = "keep_alive")]
    pub fn auto_extend(self) -> crate::Result<LockGuard> {
        let every = default_extend_every(self.ttl());
        LockGuard::start(self, every, None)
    }

    /// As [`auto_extend`](Self::auto_extend), but for at most `max_hold`
    /// from the acquisition: no extend is sent after it, and the lock lapses
    /// at the end of the validity it then has ([`LockStatus::lost`] resolves).
    /// Work that hangs, or loops for ever, cannot keep the lock from everyone
    /// else.
    ///
    /// # Errors
    ///
    /// As [`auto_extend`](Self::auto_extend).
    ///
    /// # Examples
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use quorumlock::{MemoryInstance, QuorumLocker};
    ///
    /// let redis = MemoryInstance::new("redis");
    /// let locker = QuorumLocker::builder().memory(&redis).build().await?;
    /// let lock = locker.acquire("job", Duration::from_secs(3)).await?;
    /// let guard = lock.auto_extend_for(Duration::from_secs(10))?;
    /// guard.lost().await; // a little after 10 s + the last extend's validity
    /// assert!(guard.acquired_at().elapsed() < Duration::from_secs(14));
    /// # Ok::<_, quorumlock::Error>(())
    /// # }).unwrap();
    /// ```
    pub fn auto_extend_for(self, max_hold: Duration) -> crate::Result<LockGuard> {
        let every = default_extend_every(self.ttl());
        let until = self.acquired_at().checked_add(max_hold);
        LockGuard::start(self, every, until)
    }

    /// As [`auto_extend`](Self::auto_extend), extending every `every` instead.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) when `every` is zero
    /// or more than half the validity the lock has after an extend (one failed
    /// extend would let it lapse); [`Error::NoRuntime`](crate::Error::NoRuntime)
    /// outside a Tokio runtime.
    pub fn auto_extend_every(self, every: Duration) -> crate::Result<LockGuard> {
        LockGuard::start(self, every, None)
    }
}
