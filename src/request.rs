//! A lock request with per-call options: TTL, token, metadata, how long to wait.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tracing::warn;

use crate::error::Error;
use crate::guard::LockGuard;
use crate::lease::default_extend_every;
use crate::lock::Lock;
use crate::ops::acquire::Identity;
use crate::ops::attempts;
use crate::retry::RetryPolicy;
use crate::shared::Shared;
use crate::status::LockStatus;

/// The longest token accepted.
pub const MAX_TOKEN_LEN: usize = 256;
/// The longest metadata accepted, in bytes.
pub const MAX_METADATA_LEN: usize = 4096;

/// One lock request, made by [`QuorumLocker::lock`](crate::QuorumLocker::lock): set the options, then
/// [`acquire`](Self::acquire), [`try_acquire`](Self::try_acquire) or
/// [`with_lock`](Self::with_lock).
///
/// ```no_run
/// # async fn demo(locker: quorumlock::QuorumLocker) -> quorumlock::Result<()> {
/// use std::time::Duration;
///
/// let lock = locker
///     .lock("billing-export")
///     .ttl(Duration::from_secs(60))
///     .metadata("host=worker-7")
///     .wait(Duration::from_secs(5))
///     .acquire()
///     .await?;
/// assert_eq!(lock.metadata(), Some("host=worker-7"));
/// lock.release().await?;
/// # Ok(()) }
/// ```
#[must_use = "a lock request does nothing until acquired"]
#[derive(Clone)]
pub struct LockRequest<'a> {
    shared: &'a Arc<Shared>,
    key: String,
    ttl: Duration,
    token: Option<String>,
    metadata: Option<String>,
    fenced: bool,
    wait: Option<Duration>,
    retry: Option<RetryPolicy>,
    auto_extend_every: Option<Duration>,
    max_hold: Option<Duration>,
}

impl<'a> LockRequest<'a> {
    pub(crate) fn new(shared: &'a Arc<Shared>, key: String) -> Self {
        Self {
            shared,
            key,
            ttl: shared.settings.default_ttl,
            token: None,
            metadata: None,
            fenced: false,
            wait: None,
            retry: None,
            auto_extend_every: None,
            max_hold: None,
        }
    }

    /// The lock's TTL. Default: the locker's [`default_ttl`](crate::QuorumLocker::default_ttl).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Uses `token` instead of a fresh random one, so that a process that restarts
    /// can take back (or release) the lock it held before: an instance that already
    /// holds this token for the key grants it again and resets its TTL.
    ///
    /// Anyone who knows the token can take the lock over, and two processes with
    /// the same token are one owner to Redis: use a token unique to the process
    /// (say, a host name and a job ID), never a shared constant. Within one
    /// process too, a second lock taken with the same token takes over: the first
    /// handle is lost at its next extend (and its release no longer touches the
    /// key). 1 to [`MAX_TOKEN_LEN`] printable ASCII characters, without spaces.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Text stored in Redis beside the token (`GET key` shows `token nonce metadata`), for
    /// people and tools that inspect who holds a lock: a host name, a PID, a job.
    /// At most [`MAX_METADATA_LEN`] bytes. Re-taking a lock with
    /// [`token`](Self::token) replaces it.
    pub fn metadata(mut self, metadata: impl Into<String>) -> Self {
        self.metadata = Some(metadata.into());
        self
    }

    /// Gives the lock a fencing token ([`LockStatus::fencing_token`]): a number that
    /// grows with every holder of this key, for the storage you protect to reject
    /// writes from a holder whose lock has passed on. Costs a second round trip
    /// per won attempt, and leaves one counter key per lock key on each instance
    /// (the lock key followed by [`FENCE_SUFFIX`](crate::FENCE_SUFFIX), without a
    /// TTL). See the crate docs, "Fencing tokens", for what it guarantees.
    ///
    /// With [`token`](Self::token), a re-take is a new tenure: it gets a new,
    /// larger fencing token, and the storage then rejects the earlier handle's
    /// writes once the new token has been used.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use quorumlock::{MemoryInstance, QuorumLocker};
    ///
    /// let (a, b, c) = (MemoryInstance::new("a"), MemoryInstance::new("b"), MemoryInstance::new("c"));
    /// let locker = QuorumLocker::builder().memory(&a).memory(&b).memory(&c).build().await?;
    ///
    /// let first = locker.lock("ledger").ttl(Duration::from_secs(5)).fenced().acquire().await?;
    /// let t1 = first.fencing_token().expect("fenced");
    /// // Write to the storage along with `t1`; it keeps the highest token it saw
    /// // and refuses writes that carry a lower one.
    /// first.release().await?;
    ///
    /// let second = locker.lock("ledger").ttl(Duration::from_secs(5)).fenced().acquire().await?;
    /// assert!(second.fencing_token().unwrap() > t1);
    /// assert_eq!(a.get("ledger:fence").as_deref(), Some("2")); // the counter stays
    /// # Ok::<_, quorumlock::Error>(())
    /// # }).unwrap();
    /// ```
    pub fn fenced(mut self) -> Self {
        self.fenced = true;
        self
    }

    /// How long [`acquire`](Self::acquire) and [`with_lock`](Self::with_lock) keep retrying.
    /// Default: the locker's [`default_wait`](crate::Builder::default_wait).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// The delays between attempts. Default: the locker's
    /// [`retry`](crate::Builder::retry) policy.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// How often [`with_lock`](Self::with_lock)'s watchdog extends the lock. Default: a third of
    /// the TTL.
    pub fn auto_extend_every(mut self, every: Duration) -> Self {
        self.auto_extend_every = Some(every);
        self
    }

    /// The longest [`with_lock`](Self::with_lock) keeps the lock, from its
    /// acquisition: the watchdog sends no extend after it, the lock lapses at
    /// the end of its validity, and work still running is dropped with
    /// [`Error::LockLost`]. Default: no bound.
    pub fn max_hold(mut self, max_hold: Duration) -> Self {
        self.max_hold = Some(max_hold);
        self
    }

    /// Takes the lock, retrying until the wait is over; see
    /// [`QuorumLocker::acquire`](crate::QuorumLocker::acquire).
    ///
    /// # Errors
    ///
    /// As [`QuorumLocker::acquire`](crate::QuorumLocker::acquire), and [`Error::InvalidConfig`] for a bad token or
    /// metadata.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use quorumlock::{MemoryInstance, QuorumLocker};
    ///
    /// let redis = MemoryInstance::new("redis");
    /// let locker = QuorumLocker::builder().memory(&redis).build().await?;
    /// let lock = locker
    ///     .lock("billing")
    ///     .ttl(Duration::from_secs(30))
    ///     .wait(Duration::from_secs(2))
    ///     .acquire()
    ///     .await?;
    /// lock.release().await?;
    /// # Ok::<_, quorumlock::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn acquire(&self) -> crate::Result<Lock> {
        let settings = &self.shared.settings;
        let wait = self.wait.unwrap_or(settings.default_wait);
        let retry = self.retry.unwrap_or(settings.retry);
        self.take(wait, retry).await
    }

    /// Makes one attempt; see [`QuorumLocker::try_acquire`](crate::QuorumLocker::try_acquire).
    ///
    /// # Errors
    ///
    /// As [`acquire`](Self::acquire), after one attempt.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use quorumlock::{MemoryInstance, QuorumLocker};
    ///
    /// let redis = MemoryInstance::new("redis");
    /// let locker = QuorumLocker::builder().memory(&redis).build().await?;
    /// let lock = locker.lock("billing").metadata("host=a").try_acquire().await?;
    /// assert_eq!(lock.metadata(), Some("host=a"));
    /// lock.release().await?;
    /// # Ok::<_, quorumlock::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn try_acquire(&self) -> crate::Result<Lock> {
        self.take(Duration::ZERO, RetryPolicy::never()).await
    }

    /// Checks the request, then attempts until won or the wait is over.
    async fn take(&self, wait: Duration, retry: RetryPolicy) -> crate::Result<Lock> {
        let key = self.shared.lock_key(&self.key)?;
        let lease = self.shared.lease(self.ttl)?;
        self.validate()?;
        let identity = Identity {
            token: self.token.as_deref().map(Arc::from),
            metadata: self.metadata.as_deref().map(Arc::from),
            fenced: self.fenced,
        };
        let grant = attempts::acquire(self.shared, &key, lease, &identity, wait, retry).await?;
        Ok(Lock::new(Arc::clone(self.shared), grant))
    }

    /// Takes the lock, runs `work` while a watchdog extends it, and releases it;
    /// see [`QuorumLocker::with_lock`](crate::QuorumLocker::with_lock).
    ///
    /// # Errors
    ///
    /// As [`QuorumLocker::with_lock`](crate::QuorumLocker::with_lock).
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use quorumlock::{MemoryInstance, QuorumLocker};
    ///
    /// let redis = MemoryInstance::new("redis");
    /// let locker = QuorumLocker::builder().memory(&redis).build().await?;
    /// let sum = locker
    ///     .lock("ledger")
    ///     .ttl(Duration::from_secs(3))
    ///     .with_lock(|status| async move {
    ///         assert!(status.is_valid());
    ///         2 + 2
    ///     })
    ///     .await?;
    /// assert_eq!(sum, 4);
    /// # Ok::<_, quorumlock::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn with_lock<F, Fut, T>(&self, work: F) -> crate::Result<T>
    where
        F: FnOnce(LockStatus) -> Fut,
        Fut: Future<Output = T>,
    {
        // Checked before taking the lock: bad input must cost no I/O.
        let lease = self.shared.lease(self.ttl)?;
        let every = self
            .auto_extend_every
            .unwrap_or(default_extend_every(lease.ttl()));
        lease.check_interval(every)?;
        let lock = self.acquire().await?;
        run_guarded(lock, every, self.max_hold, work).await
    }

    /// Checks the token and metadata before any I/O.
    fn validate(&self) -> crate::Result<()> {
        if let Some(token) = &self.token {
            check_token(token)?;
        }
        match &self.metadata {
            Some(metadata) if metadata.len() > MAX_METADATA_LEN => Err(Error::InvalidConfig {
                setting: "metadata",
                reason: format!(
                    "{} bytes is more than the {MAX_METADATA_LEN} allowed",
                    metadata.len()
                ),
            }),
            _ => Ok(()),
        }
    }
}

/// Runs `work` while a watchdog extends `lock` every `every` (until
/// `max_hold`, if given), then releases it: the half of `with_lock` after the
/// lock is taken, shared with the semaphore's `with_permit`.
pub(crate) async fn run_guarded<F, Fut, T>(
    lock: Lock,
    every: Duration,
    max_hold: Option<Duration>,
    work: F,
) -> crate::Result<T>
where
    F: FnOnce(LockStatus) -> Fut,
    Fut: Future<Output = T>,
{
    let key = lock.key().to_string();
    let hold_until = max_hold.and_then(|max_hold| lock.acquired_at().checked_add(max_hold));
    let guard = LockGuard::start(lock, every, hold_until)?;
    let status = guard.status();
    let started = std::panic::catch_unwind(AssertUnwindSafe(|| work(status.clone())));
    let finished: Option<Result<T, Box<dyn Any + Send>>> = match started {
        Err(panic) => Some(Err(panic)),
        Ok(work) => {
            let work = AssertUnwindSafe(work).catch_unwind();
            tokio::select! {
                biased;
                finished = work => Some(finished),
                () = status.lost() => None,
            }
        }
    };
    let loss = guard.take_loss();
    let released = guard.release().await;
    match finished {
        Some(Ok(value)) => {
            if let Err(err) = released {
                warn!(%key, %err, "the work finished but its lock could not be released");
            }
            Ok(value)
        }
        Some(Err(panic)) => std::panic::resume_unwind(panic),
        None => Err(Error::LockLost {
            key,
            source: loss.map(Box::new),
        }),
    }
}

/// A token must be printable ASCII without spaces: the space separates it from
/// the metadata in the stored value, and anything else would be hard to type in
/// `redis-cli` when someone inspects a lock.
fn check_token(token: &str) -> crate::Result<()> {
    let invalid = |reason: &str| {
        Err(Error::InvalidConfig {
            setting: "token",
            reason: reason.to_string(),
        })
    };
    if token.is_empty() {
        return invalid("empty");
    }
    if token.len() > MAX_TOKEN_LEN {
        return invalid("longer than quorumlock::MAX_TOKEN_LEN");
    }
    if !token.bytes().all(|byte| byte.is_ascii_graphic()) {
        return invalid("not printable ASCII without spaces");
    }
    Ok(())
}

impl std::fmt::Debug for LockRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockRequest")
            .field("key", &self.key)
            .field("ttl", &self.ttl)
            .field("token", &self.token)
            .field("metadata", &self.metadata)
            .field("fenced", &self.fenced)
            .field("wait", &self.wait)
            .field("retry", &self.retry)
            .field("auto_extend_every", &self.auto_extend_every)
            .field("max_hold", &self.max_hold)
            .finish()
    }
}
