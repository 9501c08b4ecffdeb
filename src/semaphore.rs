//! A counting semaphore across the locker's instances: `K` permit slots,
//! each a quorum mutex of its own (`name:permit:0` … `name:permit:{K-1}`),
//! taken by trying the slots in a random order.
//!
//! **Why at most `K` holders.** A permit is a lock on one slot, and each
//! slot's lock excludes as the mutex does; so at any instant each slot has at
//! most one holder, and there are `K` slots. Nothing else is assumed: the
//! argument holds across instance failures as far as the mutex's does, for
//! the same timing assumptions (docs/SAFETY.md). Entering one counter on a
//! majority of instances would not do (DistributedLock's reason to refuse a
//! multi-database semaphore): with `K = 2` and instances A, B, C, three
//! holders could each count on a different majority (A+B, B+C, A+C) while
//! every instance's counter says 2.
//!
//! Every client of one semaphore must use the same `K`: a client told 5
//! uses slots a client told 3 does not know.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::time::Instant;
use tracing::Instrument;

use crate::error::Error;
use crate::lease::default_extend_every;
use crate::lock::Lock;
use crate::locker::QuorumLocker;
use crate::request::run_guarded;
use crate::retry::RetryPolicy;
use crate::status::LockStatus;

/// The most permits one semaphore may have: a pass over the slots costs a
/// round trip per slot held.
pub const MAX_PERMITS: usize = 1024;

/// A counting semaphore of `permits` permits across the locker's instances;
/// made by [`QuorumLocker::semaphore`]. Cheap to clone.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::time::Duration;
/// use quorumlock::{Error, MemoryInstance, QuorumLocker};
///
/// let redis = MemoryInstance::new("redis");
/// let locker = QuorumLocker::builder().memory(&redis).build().await?;
/// let uploads = locker.semaphore("uploads", 2).ttl(Duration::from_secs(30));
/// let first = uploads.try_acquire().await?;
/// let second = uploads.try_acquire().await?;
/// assert!(matches!(uploads.try_acquire().await, Err(Error::NotAcquired { .. })));
/// assert_eq!(uploads.available().await?, 0);
/// first.release().await?;
/// assert_eq!(uploads.available().await?, 1);
/// second.release().await?;
/// # Ok::<_, quorumlock::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
#[must_use = "a semaphore does nothing until a permit is acquired"]
pub struct Semaphore {
    locker: QuorumLocker,
    name: Arc<str>,
    permits: usize,
    ttl: Option<Duration>,
    wait: Option<Duration>,
    retry: Option<RetryPolicy>,
    fenced: bool,
    metadata: Option<String>,
}

/// One permit of a [`Semaphore`]: the lock on its slot, with everything a
/// [`Lock`] offers (extend, `lost()`, release; dereferences to it).
#[must_use = "a permit dropped at once is released at once"]
pub struct Permit {
    lock: Lock,
    slot: usize,
}

impl Permit {
    /// Which of the semaphore's slots this permit holds (0 to `permits - 1`).
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// Releases the permit; as [`Lock::release`].
    ///
    /// # Errors
    ///
    /// As [`Lock::release`].
    ///
    /// # Cancel safety
    ///
    /// As [`Lock::release`]: dropped midway, the release finishes in the
    /// background.
    pub async fn release(self) -> crate::Result<usize> {
        self.lock.release().await
    }

    /// The lock behind the permit.
    pub fn into_lock(self) -> Lock {
        self.lock
    }
}

impl std::ops::Deref for Permit {
    type Target = Lock;

    fn deref(&self) -> &Lock {
        &self.lock
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("slot", &self.slot)
            .field("lock", &self.lock)
            .finish()
    }
}

impl QuorumLocker {
    /// A counting semaphore named `name` with `permits` permits across the
    /// instances: at most `permits` holders at once. Every client of the
    /// semaphore must give the same `permits`. Its slots are the lock keys
    /// `name:permit:0` to `name:permit:{permits - 1}`.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use quorumlock::{MemoryInstance, QuorumLocker};
    ///
    /// let redis = MemoryInstance::new("redis");
    /// let locker = QuorumLocker::builder().memory(&redis).build().await?;
    /// let permit = locker.semaphore("exports", 4).acquire().await?;
    /// assert!(permit.slot() < 4);
    /// permit.release().await?;
    /// # Ok::<_, quorumlock::Error>(())
    /// # }).unwrap();
    /// ```
    pub fn semaphore(&self, name: impl Into<String>, permits: usize) -> Semaphore {
        Semaphore {
            locker: self.clone(),
            name: name.into().into(),
            permits,
            ttl: None,
            wait: None,
            retry: None,
            fenced: false,
            metadata: None,
        }
    }
}

impl Semaphore {
    /// Each permit's TTL. Default: the locker's default TTL.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// How long [`acquire`](Self::acquire) keeps trying. Default: the locker's
    /// default wait.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// The pause between passes over the slots. Default: the locker's.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Fencing tokens per slot (see [`LockRequest::fenced`](crate::LockRequest::fenced)):
    /// successive holders of one slot get increasing tokens.
    pub fn fenced(mut self) -> Self {
        self.fenced = true;
        self
    }

    /// Metadata stored with each permit, as for a lock.
    pub fn metadata(mut self, metadata: impl Into<String>) -> Self {
        self.metadata = Some(metadata.into());
        self
    }

    /// The semaphore's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many permits it has.
    pub fn permits(&self) -> usize {
        self.permits
    }

    fn slot_key(&self, slot: usize) -> String {
        format!("{}:permit:{slot}", self.name)
    }

    fn check(&self) -> crate::Result<()> {
        if self.permits == 0 || self.permits > MAX_PERMITS {
            return Err(Error::InvalidConfig {
                setting: "permits",
                reason: format!("{} is not between 1 and {MAX_PERMITS}", self.permits),
            });
        }
        if self.name.is_empty() {
            return Err(Error::EmptyKey);
        }
        Ok(())
    }

    /// Tries every slot once, in a random order, and takes the first free one.
    ///
    /// # Errors
    ///
    /// [`Error::NotAcquired`] (naming the semaphore) when every slot is held,
    /// with the last slot's votes; [`Error::InvalidConfig`] for 0 permits or
    /// more than [`MAX_PERMITS`], and the lock's own input errors
    /// ([`Error::InvalidTtl`], [`Error::ReservedKey`], …) before any I/O.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: each slot's attempt is (a dropped attempt is rolled
    /// back), and a permit taken is returned, not held unseen.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use quorumlock::{MemoryInstance, QuorumLocker};
    ///
    /// let redis = MemoryInstance::new("redis");
    /// let locker = QuorumLocker::builder().memory(&redis).build().await?;
    /// let permit = locker.semaphore("crawlers", 1).try_acquire().await?;
    /// assert!(locker.semaphore("crawlers", 1).try_acquire().await.is_err());
    /// permit.release().await?;
    /// # Ok::<_, quorumlock::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn try_acquire(&self) -> crate::Result<Permit> {
        self.check()?;
        self.pass(1).instrument(self.span()).await
    }

    /// The span a semaphore's passes run in; each slot's attempt is a lock's,
    /// with the lock's own spans inside.
    fn span(&self) -> tracing::Span {
        tracing::debug_span!("semaphore", name = %self.name, permits = self.permits)
    }

    /// Passes over the slots until one is free or the wait is over, pausing
    /// between passes by the retry policy.
    ///
    /// # Errors
    ///
    /// As [`try_acquire`](Self::try_acquire), once the wait is over
    /// (`attempts` counts the passes).
    ///
    /// # Cancel safety
    ///
    /// As [`try_acquire`](Self::try_acquire).
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use quorumlock::{MemoryInstance, QuorumLocker};
    ///
    /// let redis = MemoryInstance::new("redis");
    /// let locker = QuorumLocker::builder().memory(&redis).build().await?;
    /// let permit = locker
    ///     .semaphore("renders", 3)
    ///     .wait(Duration::from_secs(1))
    ///     .acquire()
    ///     .await?;
    /// permit.release().await?;
    /// # Ok::<_, quorumlock::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn acquire(&self) -> crate::Result<Permit> {
        self.check()?;
        let settings = &self.locker.shared().settings;
        let wait = self.wait.unwrap_or(settings.default_wait);
        let retry = self.retry.unwrap_or(settings.retry);
        let deadline = Instant::now() + wait;
        self.passes_until(deadline, retry)
            .instrument(self.span())
            .await
    }

    async fn passes_until(&self, deadline: Instant, retry: RetryPolicy) -> crate::Result<Permit> {
        let mut passes = 1;
        loop {
            let lost = match self.pass(passes).await {
                Err(lost @ Error::NotAcquired { .. }) if Instant::now() < deadline => lost,
                other => return other,
            };
            // The policy gave up (`with_max_attempts` counts passes).
            let Some(delay) = retry.delay(passes) else {
                return Err(lost);
            };
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(delay.min(left)).await;
            passes += 1;
        }
    }

    /// One pass: the slots in a random order, the first free one taken.
    async fn pass(&self, passes: u32) -> crate::Result<Permit> {
        let mut order: Vec<usize> = (0..self.permits).collect();
        shuffle(&mut order);
        let mut last = None;
        for slot in order {
            let key = self.slot_key(slot);
            let mut request = self.locker.lock(key);
            if let Some(ttl) = self.ttl {
                request = request.ttl(ttl);
            }
            if let Some(metadata) = &self.metadata {
                request = request.metadata(metadata.clone());
            }
            if self.fenced {
                request = request.fenced();
            }
            match request.try_acquire().await {
                Ok(lock) => return Ok(Permit { lock, slot }),
                Err(err @ Error::NotAcquired { .. }) => last = Some(err),
                Err(other) => return Err(other),
            }
        }
        Err(match last {
            Some(Error::NotAcquired {
                shortfall, causes, ..
            }) => Error::NotAcquired {
                key: self.name.to_string(),
                attempts: passes,
                shortfall,
                causes,
            },
            _ => unreachable!("a semaphore has at least one slot"),
        })
    }

    /// How many permits are free now: the slots no quorum holds, read with
    /// [`QuorumLocker::inspect`]. For observation: the answer may be stale by
    /// the time it arrives.
    ///
    /// # Errors
    ///
    /// As [`QuorumLocker::inspect`] for any slot; [`Error::InvalidConfig`] as
    /// for [`try_acquire`](Self::try_acquire).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only reads.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use quorumlock::{MemoryInstance, QuorumLocker};
    ///
    /// let redis = MemoryInstance::new("redis");
    /// let locker = QuorumLocker::builder().memory(&redis).build().await?;
    /// assert_eq!(locker.semaphore("jobs", 5).available().await?, 5);
    /// # Ok::<_, quorumlock::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn available(&self) -> crate::Result<usize> {
        self.check()?;
        let reads = join_all((0..self.permits).map(|slot| {
            let key = self.slot_key(slot);
            async move { self.locker.inspect(&key).await }
        }))
        .await;
        let mut free = 0;
        for read in reads {
            if read?.holder().is_none() {
                free += 1;
            }
        }
        Ok(free)
    }

    /// Takes a permit, runs `work` while a watchdog extends it (every third of
    /// the TTL), and releases it; as [`QuorumLocker::with_lock`].
    ///
    /// # Errors
    ///
    /// As [`acquire`](Self::acquire); [`Error::LockLost`] when the permit is
    /// lost while `work` runs (the work is dropped at its next await).
    ///
    /// # Cancel safety
    ///
    /// As [`QuorumLocker::with_lock`]: dropped, the work stops and the permit
    /// is released in the background.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use quorumlock::{MemoryInstance, QuorumLocker};
    ///
    /// let redis = MemoryInstance::new("redis");
    /// let locker = QuorumLocker::builder().memory(&redis).build().await?;
    /// let done = locker
    ///     .semaphore("encoders", 2)
    ///     .with_permit(|status| async move { status.is_valid() })
    ///     .await?;
    /// assert!(done);
    /// # Ok::<_, quorumlock::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn with_permit<F, Fut, T>(&self, work: F) -> crate::Result<T>
    where
        F: FnOnce(LockStatus) -> Fut,
        Fut: Future<Output = T>,
    {
        let ttl = self.ttl.unwrap_or(self.locker.default_ttl());
        let every = default_extend_every(ttl);
        let permit = self.acquire().await?;
        run_guarded(permit.into_lock(), every, None, work).await
    }
}

/// Fisher–Yates with the OS's randomness (the crate has no RNG of its own):
/// holders that start together spread over the slots instead of all trying
/// slot 0 first.
fn shuffle(order: &mut [usize]) {
    for i in (1..order.len()).rev() {
        let bits = getrandom::u64().unwrap_or(i as u64);
        let j = usize::try_from(bits % (i as u64 + 1)).unwrap_or(0);
        order.swap(i, j);
    }
}
