//! The locker: N instances in order, a quorum, and the acquire loop.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::acquire::{self, Outcome};
use crate::background::Background;
use crate::builder::Builder;
use crate::error::Error;
use crate::fanout::Fanout;
use crate::instance::Member;
use crate::lock::Lock;
use crate::quorum;
use crate::retry::RetryPolicy;

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

    pub(crate) fn from_shared(shared: Shared) -> Self {
        Self {
            shared: Arc::new(shared),
        }
    }

    /// Takes `key` for `ttl`, retrying with randomised delays (the
    /// [`RetryPolicy`]) until the acquire timeout.
    ///
    /// Each attempt sends `SET key token NX PX ttl` to every instance at once and
    /// is decided at the quorum-th grant (or once a quorum is out of reach); a lost
    /// attempt is rolled back on every instance that may hold its token.
    ///
    /// # Errors
    ///
    /// - [`Error::NotAcquired`] when the timeout or the attempt limit is reached;
    ///   it carries every instance's vote in the last attempt;
    /// - [`Error::EmptyKey`] or [`Error::InvalidTtl`] for bad input, before any I/O.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future at any point leaves no key with its token behind: the
    /// attempt in flight is rolled back in the background.
    pub async fn acquire(&self, key: &str, ttl: Duration) -> crate::Result<Lock> {
        let key = self.lock_key(key, ttl)?;
        let started = Instant::now();
        let deadline = started.checked_add(self.shared.settings.acquire_timeout);
        let mut attempts = 0u32;
        loop {
            attempts = attempts.saturating_add(1);
            let (shortfall, causes) = match acquire::attempt(&self.shared, &key, ttl).await? {
                Outcome::Won(lock) => return Ok(lock),
                Outcome::Lost { shortfall, causes } => (shortfall, causes),
            };
            let retry_at = self
                .shared
                .settings
                .retry
                .delay(attempts)
                .and_then(|delay| Instant::now().checked_add(delay))
                .filter(|at| deadline.is_none_or(|deadline| *at < deadline));
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => {
                    return Err(Error::NotAcquired {
                        key: key.user.to_string(),
                        attempts,
                        shortfall,
                        causes,
                    })
                }
            }
        }
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
        let key = self.lock_key(key, ttl)?;
        match acquire::attempt(&self.shared, &key, ttl).await? {
            Outcome::Won(lock) => Ok(lock),
            Outcome::Lost { shortfall, causes } => Err(Error::NotAcquired {
                key: key.user.to_string(),
                attempts: 1,
                shortfall,
                causes,
            }),
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

    /// Connects to every instance and loads the Lua scripts there, so that the first
    /// lock pays for neither. Returns how many instances are ready.
    ///
    /// Locks work without it: connections open on first use and scripts load on a
    /// `NOSCRIPT` answer.
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`] when fewer than a quorum of instances are ready; its
    /// causes say what each answered.
    pub async fn prepare(&self) -> crate::Result<usize> {
        let members = &self.shared.members;
        // Loading may include connecting: allow a connection's worth of time.
        let timeout = self
            .shared
            .settings
            .instance_timeout
            .max(Duration::from_secs(1));
        let mut fanout = Fanout::start(members, |member| member.instance.load_scripts());
        fanout
            .collect(Instant::now() + timeout, timeout, |tally| {
                tally.answered() == members.len()
            })
            .await;
        let ready = fanout.tally().granted;
        if ready >= self.shared.quorum {
            Ok(ready)
        } else {
            Err(Error::Unavailable {
                operation: "prepare",
                key: String::new(),
                causes: fanout.votes(members),
            })
        }
    }

    /// Waits until the background work this locker started has finished: rollbacks
    /// of lost or dropped attempts, and deletes still in flight after `release`
    /// returned. Useful before shutting down, and in tests.
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
        Ok(LockKey {
            user: key.into(),
            redis: redis.into(),
        })
    }
}

/// A TTL must be whole milliseconds of at least one, at most [`MAX_TTL`], and
/// longer than its drift allowance (or no attempt could ever be valid).
pub(crate) fn check_ttl(ttl: Duration, drift_factor: f64) -> crate::Result<()> {
    let invalid = |reason| Err(Error::InvalidTtl { ttl, reason });
    if ttl.as_millis() == 0 {
        return invalid("shorter than the 1 ms resolution of PX");
    }
    if ttl > MAX_TTL {
        return invalid("longer than quorumlock::MAX_TTL");
    }
    if ttl <= quorum::drift(ttl, drift_factor) {
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
