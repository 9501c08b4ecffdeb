//! The public, cloneable view of a held lock's state.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::ops::held::Held;
use crate::token;

/// A live view of a held lock: its key, token and validity, and a future that
/// resolves when the lock is lost. The one place these are read: [`Lock`] and
/// [`LockGuard`] dereference to it, [`QuorumLocker::with_lock`] hands one to
/// the work it runs, and [`Lock::status`] and [`LockGuard::status`] make
/// clones to move into other tasks.
///
/// [`Lock`]: crate::Lock
/// [`LockGuard`]: crate::LockGuard
///
/// [`QuorumLocker::with_lock`]: crate::QuorumLocker::with_lock
/// [`Lock::status`]: crate::Lock::status
/// [`LockGuard::status`]: crate::LockGuard::status
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::time::Duration;
/// use quorumlock::{MemoryInstance, QuorumLocker};
///
/// let redis = MemoryInstance::new("redis");
/// let locker = QuorumLocker::builder().memory(&redis).build().await?;
/// let lock = locker.acquire("job", Duration::from_secs(10)).await?;
/// let status = lock.status(); // a clone, to move into another task
/// let watcher = tokio::spawn(async move { status.lost().await });
/// lock.release().await?;
/// watcher.await.unwrap(); // resolves once the lock is released
/// # Ok::<_, quorumlock::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct LockStatus {
    held: Arc<Held>,
}

impl LockStatus {
    pub(crate) fn new(held: Arc<Held>) -> Self {
        Self { held }
    }

    pub(crate) fn held(&self) -> &Arc<Held> {
        &self.held
    }

    /// The key as given to `acquire` (without the locker's key prefix).
    pub fn key(&self) -> &str {
        &self.held.key.user
    }

    /// The token that marks this owner's value in Redis: 32 random hex digits, or
    /// the token chosen with [`LockRequest::token`](crate::LockRequest::token).
    pub fn token(&self) -> &str {
        &self.held.token
    }

    /// The fencing token of a lock requested with
    /// [`LockRequest::fenced`](crate::LockRequest::fenced); `None` otherwise.
    ///
    /// Tokens of successive holders of a key strictly increase (under the
    /// conditions in the crate docs, "Fencing tokens"). Send it with every write
    /// to the storage this lock protects, and have the storage refuse a write
    /// whose token is lower than the highest it has seen: a holder that paused
    /// past its validity is then refused once its successor has written. An
    /// extend keeps the token.
    pub fn fencing_token(&self) -> Option<u64> {
        self.held.fencing_token()
    }

    /// The metadata stored beside the token (see
    /// [`LockRequest::metadata`](crate::LockRequest::metadata)), if any.
    pub fn metadata(&self) -> Option<&str> {
        self.held.metadata()
    }

    /// The TTL last set on the instances: the acquire's, or the last extend's.
    pub fn ttl(&self) -> Duration {
        self.held.ttl()
    }

    /// When the winning attempt started.
    pub fn acquired_at(&self) -> Instant {
        self.held.acquired_at
    }

    /// The end of the validity: `start + lifetime − drift allowance`, where
    /// `start` is when the acquire (or the last successful extend) started and
    /// `lifetime` is how long the granting instances keep the key by their
    /// clocks' rate bounds (`ttl` when they run true; see the crate docs, *Clock
    /// drift*). Past it, the lock may be held by someone else.
    ///
    /// Once the lock is lost or released it promises no more time: this is then
    /// no later than when the loss was noticed. An extend to a shorter TTL
    /// moves it earlier before its requests leave.
    pub fn valid_until(&self) -> Instant {
        self.held.valid_until()
    }

    /// The validity left now: zero once it has run out, or once the lock was
    /// lost or released.
    pub fn remaining(&self) -> Duration {
        self.held.remaining()
    }

    /// Whether validity is left and no extend has failed (nor a release run).
    pub fn is_valid(&self) -> bool {
        !self.held.is_lost()
    }

    /// Whether the watchdog's last extend could not be confirmed (instances
    /// slow, out of reach, or too few answering) while validity is left: the
    /// lock may be lost at [`valid_until`](Self::valid_until) unless a retry
    /// gets through. A successful extend clears it; a lost lock is not at risk
    /// but lost.
    pub fn is_at_risk(&self) -> bool {
        self.held.is_at_risk()
    }

    /// Resolves when the lock is at risk (see [`is_at_risk`](Self::is_at_risk))
    /// or lost, whichever comes first: the moment for work to stop its side
    /// effects while it still holds the lock, rather than after. Owns what it
    /// needs, like [`lost`](Self::lost).
    ///
    /// ```no_run
    /// # async fn demo(lock: quorumlock::LockGuard) {
    /// tokio::select! {
    ///     () = lock.at_risk() => { /* checkpoint and stop writing; validity is left */ }
    ///     () = async { /* the work */ } => {}
    /// }
    /// # }
    /// ```
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only waits.
    pub fn at_risk(&self) -> impl Future<Output = ()> + Send + 'static {
        let held = Arc::clone(&self.held);
        async move { held.endangered().await }
    }

    /// Resolves when the lock is no longer valid: its validity ran out, an
    /// extend failed, or it was released; at once if that has already
    /// happened. The future owns what it needs, so it can be moved into
    /// another task. For a loop of your own:
    ///
    /// ```no_run
    /// # async fn demo(lock: quorumlock::Lock) {
    /// let mut batches = tokio::time::interval(std::time::Duration::from_millis(100));
    /// loop {
    ///     tokio::select! {
    ///         () = lock.lost() => break, // stop: someone else may hold it now
    ///         _ = batches.tick() => { /* one batch of work, then extend */ }
    ///     }
    /// }
    /// # }
    /// ```
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only waits.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        let held = Arc::clone(&self.held);
        async move { held.lost().await }
    }
}

impl fmt::Debug for LockStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockStatus")
            .field("key", &self.key())
            .field(
                "token",
                &format_args!("{}…", token::abbreviate(self.token())),
            )
            .field("remaining", &self.remaining())
            .finish()
    }
}
