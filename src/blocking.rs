//! A blocking API (cargo feature `blocking`) for code that is not async (scripts, threads, sync
//! services), in the shape of `reqwest::blocking`: the locker runs on a small
//! Tokio runtime of its own, each call blocks the calling thread until it is
//! done, and dropping a lock releases it before the drop returns.
//!
//! The types mirror the async ones: [`QuorumLocker`], [`Lock`] and
//! [`LockGuard`] (both dereference to the same [`LockStatus`]). A locker is
//! built from the same [`Builder`](crate::Builder).
//!
//! ```
//! use std::time::Duration;
//! use quorumlock::blocking::QuorumLocker;
//! use quorumlock::MemoryInstance;
//!
//! let redis = MemoryInstance::new("redis");
//! let locker = QuorumLocker::build(quorumlock::QuorumLocker::builder().memory(&redis))?;
//! let lock = locker.acquire("nightly-report", Duration::from_secs(30))?;
//! assert!(lock.is_valid());
//! lock.release()?;
//!
//! let rows = locker.with_lock("refill-cache", Duration::from_secs(10), |status| {
//!     assert!(status.is_valid()); // the watchdog extends it meanwhile
//!     42
//! })?;
//! assert_eq!(rows, 42);
//! # Ok::<_, quorumlock::Error>(())
//! ```
//!
//! Calls from inside an async runtime are refused with
//! [`Error::InsideRuntime`]: blocking there would stall the runtime's thread.

use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Runtime;

use crate::error::Error;
use crate::health::Health;
use crate::inspect::Inspection;
use crate::request::LockRequest;
use crate::status::LockStatus;

/// How long dropping the last handle waits for background work (rollbacks,
/// releases still in flight) before the runtime shuts down.
const SHUTDOWN: Duration = Duration::from_secs(1);

/// The runtime every handle of one locker shares; shut down, after a bounded
/// wait for background work, when the last handle goes.
struct Driver {
    runtime: Option<Runtime>,
    locker: crate::QuorumLocker,
}

impl Driver {
    /// Runs `future` to completion on the locker's runtime, blocking this
    /// thread; refused inside an async runtime.
    fn run<F: Future>(&self, future: F) -> crate::Result<F::Output> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(Error::InsideRuntime);
        }
        match &self.runtime {
            Some(runtime) => Ok(runtime.block_on(future)),
            None => Err(Error::NoRuntime),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            if tokio::runtime::Handle::try_current().is_err() {
                let locker = &self.locker;
                let _ = runtime
                    .block_on(async { tokio::time::timeout(SHUTDOWN, locker.settle()).await });
            }
            runtime.shutdown_timeout(SHUTDOWN);
        }
    }
}

/// The blocking counterpart of [`crate::QuorumLocker`]; clone it freely
/// (clones share the connections and the runtime).
#[derive(Clone)]
pub struct QuorumLocker {
    driver: Arc<Driver>,
}

impl QuorumLocker {
    /// Builds a locker from `builder` on a runtime of its own (one worker
    /// thread, plus the calling thread while a call blocks).
    ///
    /// # Errors
    ///
    /// As [`Builder::build`](crate::Builder::build); [`Error::Runtime`] when
    /// the runtime cannot start, [`Error::InsideRuntime`] from async code.
    ///
    /// # Examples
    ///
    /// ```
    /// let redis = quorumlock::MemoryInstance::new("redis");
    /// let builder = quorumlock::QuorumLocker::builder().memory(&redis);
    /// let locker = quorumlock::blocking::QuorumLocker::build(builder)?;
    /// assert_eq!(locker.quorum(), 1);
    /// # Ok::<_, quorumlock::Error>(())
    /// ```
    pub fn build(builder: crate::Builder) -> crate::Result<Self> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(Error::InsideRuntime);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("quorumlock-blocking")
            .enable_all()
            .build()
            .map_err(|err| Error::Runtime(err.to_string()))?;
        let locker = runtime.block_on(builder.build())?;
        Ok(Self {
            driver: Arc::new(Driver {
                runtime: Some(runtime),
                locker,
            }),
        })
    }

    /// The async locker behind this one, for what the blocking API does not
    /// mirror (per-call options through [`lock`](Self::lock)).
    pub fn as_async(&self) -> &crate::QuorumLocker {
        &self.driver.locker
    }

    /// As [`crate::QuorumLocker::acquire`], blocking.
    ///
    /// # Errors
    ///
    /// As [`crate::QuorumLocker::acquire`], and [`Error::InsideRuntime`].
    ///
    /// # Examples
    ///
    /// ```
    /// # let redis = quorumlock::MemoryInstance::new("redis");
    /// # let locker = quorumlock::blocking::QuorumLocker::build(quorumlock::QuorumLocker::builder().memory(&redis))?;
    /// let lock = locker.acquire("job", std::time::Duration::from_secs(10))?;
    /// drop(lock); // released before `drop` returns
    /// assert_eq!(redis.get("job"), None);
    /// # Ok::<_, quorumlock::Error>(())
    /// ```
    pub fn acquire(&self, key: &str, ttl: Duration) -> crate::Result<Lock> {
        self.lock(|locker| locker.lock(key).ttl(ttl))
    }

    /// As [`crate::QuorumLocker::try_acquire`], blocking.
    ///
    /// # Errors
    ///
    /// As [`crate::QuorumLocker::try_acquire`], and [`Error::InsideRuntime`].
    ///
    /// # Examples
    ///
    /// ```
    /// # let redis = quorumlock::MemoryInstance::new("redis");
    /// # let locker = quorumlock::blocking::QuorumLocker::build(quorumlock::QuorumLocker::builder().memory(&redis))?;
    /// let held = locker.try_acquire("job", std::time::Duration::from_secs(10))?;
    /// assert!(locker.try_acquire("job", std::time::Duration::from_secs(10)).is_err());
    /// # Ok::<_, quorumlock::Error>(())
    /// ```
    pub fn try_acquire(&self, key: &str, ttl: Duration) -> crate::Result<Lock> {
        let lock = self
            .driver
            .run(self.driver.locker.try_acquire(key, ttl))??;
        Ok(self.wrap(lock))
    }

    /// Takes a lock with per-call options: `request` shapes the
    /// [`LockRequest`] (token, metadata, wait, fencing), and it is acquired
    /// blocking.
    ///
    /// # Errors
    ///
    /// As [`LockRequest::acquire`], and [`Error::InsideRuntime`].
    ///
    /// # Examples
    ///
    /// ```
    /// # let redis = quorumlock::MemoryInstance::new("redis");
    /// # let locker = quorumlock::blocking::QuorumLocker::build(quorumlock::QuorumLocker::builder().memory(&redis))?;
    /// use std::time::Duration;
    ///
    /// let lock = locker.lock(|l| l.lock("export").ttl(Duration::from_secs(30)).metadata("host=a"))?;
    /// assert_eq!(lock.metadata(), Some("host=a"));
    /// # Ok::<_, quorumlock::Error>(())
    /// ```
    pub fn lock<'a>(
        &'a self,
        request: impl FnOnce(&'a crate::QuorumLocker) -> LockRequest<'a>,
    ) -> crate::Result<Lock> {
        let request = request(&self.driver.locker);
        let lock = self.driver.run(request.acquire())??;
        Ok(self.wrap(lock))
    }

    /// Takes `key`, runs `work` on this thread while a watchdog (on the
    /// locker's runtime) extends the lock, and releases it when the work
    /// returns or panics. Unlike the async `with_lock`, the work cannot be
    /// cut short: check [`LockStatus::is_valid`] (or
    /// [`is_at_risk`](LockStatus::is_at_risk)) between steps of long work.
    ///
    /// # Errors
    ///
    /// As [`crate::QuorumLocker::acquire`] before the work starts;
    /// [`Error::LockLost`] when the lock was lost while the work ran (the
    /// work's result is then discarded).
    ///
    /// # Examples
    ///
    /// ```
    /// # let redis = quorumlock::MemoryInstance::new("redis");
    /// # let locker = quorumlock::blocking::QuorumLocker::build(quorumlock::QuorumLocker::builder().memory(&redis))?;
    /// let n = locker.with_lock("job", std::time::Duration::from_secs(3), |_status| 7)?;
    /// assert_eq!(n, 7);
    /// # Ok::<_, quorumlock::Error>(())
    /// ```
    pub fn with_lock<T>(
        &self,
        key: &str,
        ttl: Duration,
        work: impl FnOnce(&LockStatus) -> T,
    ) -> crate::Result<T> {
        let guard = self.acquire(key, ttl)?.auto_extend()?;
        let status = guard.status();
        // Released however the work ends: the guard drops on a panic too.
        let value = work(&status);
        let lost = !status.is_valid();
        let loss = guard.take_loss();
        let released = guard.release();
        if lost {
            return Err(Error::LockLost {
                key: key.to_string(),
                source: loss.map(Box::new),
            });
        }
        if let Err(err) = released {
            tracing::warn!(%key, %err, "the work finished but its lock could not be released");
        }
        Ok(value)
    }

    /// As [`crate::QuorumLocker::prepare`], blocking.
    ///
    /// # Errors
    ///
    /// As [`crate::QuorumLocker::prepare`], and [`Error::InsideRuntime`].
    pub fn prepare(&self) -> crate::Result<Health> {
        self.driver.run(self.driver.locker.prepare())?
    }

    /// As [`crate::QuorumLocker::health`], blocking.
    ///
    /// # Errors
    ///
    /// [`Error::InsideRuntime`] from async code.
    pub fn health(&self) -> crate::Result<Health> {
        self.driver.run(self.driver.locker.health())
    }

    /// As [`crate::QuorumLocker::inspect`], blocking.
    ///
    /// # Errors
    ///
    /// As [`crate::QuorumLocker::inspect`], and [`Error::InsideRuntime`].
    pub fn inspect(&self, key: &str) -> crate::Result<Inspection> {
        self.driver.run(self.driver.locker.inspect(key))?
    }

    /// As [`crate::QuorumLocker::force_release`], blocking.
    ///
    /// # Errors
    ///
    /// As [`crate::QuorumLocker::force_release`], and
    /// [`Error::InsideRuntime`].
    pub fn force_release(&self, key: &str) -> crate::Result<usize> {
        self.driver.run(self.driver.locker.force_release(key))?
    }

    /// As [`crate::QuorumLocker::settle`], blocking.
    ///
    /// # Errors
    ///
    /// [`Error::InsideRuntime`] from async code.
    pub fn settle(&self) -> crate::Result<()> {
        self.driver.run(self.driver.locker.settle())
    }

    /// The number of instances that must grant a lock.
    pub fn quorum(&self) -> usize {
        self.driver.locker.quorum()
    }

    fn wrap(&self, lock: crate::Lock) -> Lock {
        Lock {
            lock: Some(lock),
            driver: Arc::clone(&self.driver),
        }
    }
}

/// The blocking counterpart of [`crate::Lock`]; dereferences to its
/// [`LockStatus`]. Dropping it releases the lock before the drop returns.
#[must_use = "dropping a lock releases it at once; keep it while the work runs"]
pub struct Lock {
    /// `None` once released or handed to a guard.
    lock: Option<crate::Lock>,
    driver: Arc<Driver>,
}

impl Lock {
    fn inner(&self) -> &crate::Lock {
        // Only `release` and `auto_extend` take it, and they consume `self`.
        self.lock.as_ref().expect("a live lock")
    }

    /// A clone of the view this lock dereferences to, to hand to another
    /// thread.
    pub fn status(&self) -> LockStatus {
        (**self).clone()
    }

    /// As [`crate::Lock::extend`], blocking.
    ///
    /// # Errors
    ///
    /// As [`crate::Lock::extend`], and [`Error::InsideRuntime`].
    pub fn extend(&self, ttl: Duration) -> crate::Result<Duration> {
        self.driver.run(self.inner().extend(ttl))?
    }

    /// As [`crate::Lock::release`], blocking.
    ///
    /// # Errors
    ///
    /// As [`crate::Lock::release`], and [`Error::InsideRuntime`] (the lock
    /// is then released in the background).
    pub fn release(mut self) -> crate::Result<usize> {
        let lock = self.lock.take().expect("a live lock");
        self.driver.run(lock.release())?
    }

    /// As [`crate::Lock::auto_extend`]: a watchdog on the locker's runtime
    /// extends the lock while the returned guard lives.
    ///
    /// # Errors
    ///
    /// As [`crate::Lock::auto_extend`].
    pub fn auto_extend(mut self) -> crate::Result<LockGuard> {
        let lock = self.lock.take().expect("a live lock");
        let guard = {
            let _inside = self.driver.runtime.as_ref().map(Runtime::enter);
            lock.auto_extend()?
        };
        Ok(LockGuard {
            guard: Some(guard),
            driver: Arc::clone(&self.driver),
        })
    }
}

impl Deref for Lock {
    type Target = LockStatus;

    fn deref(&self) -> &LockStatus {
        self.inner()
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if let Some(lock) = self.lock.take() {
            // From async code (or after shutdown) it falls back to the async
            // lock's own drop: a release in the background.
            let _ = self.driver.run(lock.release());
        }
    }
}

impl std::fmt::Debug for Lock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.lock {
            Some(lock) => lock.fmt(f),
            None => f.write_str("Lock(released)"),
        }
    }
}

/// The blocking counterpart of [`crate::LockGuard`]: a lock a watchdog keeps
/// extending; dereferences to its [`LockStatus`]. Dropping it stops the
/// watchdog and releases the lock before the drop returns.
#[must_use = "dropping the guard releases the lock at once"]
pub struct LockGuard {
    guard: Option<crate::LockGuard>,
    driver: Arc<Driver>,
}

impl LockGuard {
    /// A clone of the view this guard dereferences to, to hand to another
    /// thread.
    pub fn status(&self) -> LockStatus {
        (**self).clone()
    }

    /// Stops the watchdog and releases the lock, blocking.
    ///
    /// # Errors
    ///
    /// As [`crate::LockGuard::release`], and [`Error::InsideRuntime`].
    pub fn release(mut self) -> crate::Result<usize> {
        let guard = self.guard.take().expect("a live guard");
        self.driver.run(guard.release())?
    }

    /// Why the lock was lost, when a failed extend is the reason; taken once.
    fn take_loss(&self) -> Option<Error> {
        self.guard.as_ref().and_then(crate::LockGuard::take_loss)
    }
}

impl Deref for LockGuard {
    type Target = LockStatus;

    fn deref(&self) -> &LockStatus {
        self.guard.as_ref().expect("a live guard")
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(guard) = self.guard.take() {
            let _ = self.driver.run(guard.release());
        }
    }
}
