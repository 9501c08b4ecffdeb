//! The lock handle: proof of ownership of one key.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use crate::fanout::Straggler;
use crate::metrics;
use crate::ops::acquire::Grant;
use crate::ops::held::Held;
use crate::shared::Shared;
use crate::status::LockStatus;
use crate::token;

/// A lock held on a quorum of instances, returned by
/// [`QuorumLocker::acquire`](crate::QuorumLocker::acquire) and
/// [`try_acquire`](crate::QuorumLocker::try_acquire).
///
/// The lock is yours until [`valid_until`](LockStatus::valid_until) on this
/// process's monotonic clock, provided the timing assumptions in the crate docs
/// hold. A lock dereferences to its [`LockStatus`]: `lock.key()`,
/// `lock.token()`, `lock.fencing_token()`, `lock.remaining()`, `lock.lost()`
/// and the rest are documented there.
/// [`extend`](Self::extend) it to keep it longer, or hand it to a watchdog with
/// [`auto_extend`](Self::auto_extend); [`release`](Self::release) it when the work is
/// done.
///
/// Dropping a lock without releasing it starts a release in the background (retried
/// while the keys may still exist), so a lock is never leaked by an early return, a
/// `?` or a panic. Outside a Tokio runtime there is nowhere to run it, and the keys
/// expire by their TTL.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::time::Duration;
/// use quorumlock::{MemoryInstance, QuorumLocker};
///
/// let redis = MemoryInstance::new("redis");
/// let locker = QuorumLocker::builder().memory(&redis).build().await?;
/// let lock = locker.acquire("migrate", Duration::from_secs(10)).await?;
/// // A lock dereferences to its `LockStatus`: key, token, validity.
/// assert_eq!(lock.key(), "migrate");
/// assert!(lock.is_valid());
/// lock.extend(Duration::from_secs(10)).await?;
/// lock.release().await?;
/// # Ok::<_, quorumlock::Error>(())
/// # }).unwrap();
/// ```
#[must_use = "dropping a lock releases it at once; keep it while the work runs"]
pub struct Lock {
    shared: Arc<Shared>,
    /// The lock's state, seen through the same view as every `LockStatus`.
    status: LockStatus,
    /// Sets of the winning attempt that were still in flight when it was decided.
    stragglers: Arc<[Straggler]>,
    /// Cleared once a release has run to an answer, so `Drop` has nothing to do.
    release_on_drop: bool,
}

impl Lock {
    /// The handle of a won attempt: from here its drop releases.
    pub(crate) fn new(shared: Arc<Shared>, grant: Grant) -> Self {
        Self {
            shared,
            status: LockStatus::new(grant.held),
            stragglers: grant.stragglers,
            release_on_drop: true,
        }
    }

    /// A cloneable view of this lock, to move into another task: the same
    /// methods this lock dereferences to.
    pub fn status(&self) -> LockStatus {
        self.status.clone()
    }

    /// Sets the key's TTL to `ttl` on every instance where it still holds this
    /// lock's token (compare-and-pexpire, in parallel), and returns the new
    /// validity. Like an acquire, it needs a quorum, and the validity is counted
    /// from the extend's own start: `ttl − elapsed − drift allowance`.
    ///
    /// # Errors
    ///
    /// - [`Error::LockLost`](crate::Error::LockLost) when the validity had already run out or an earlier
    ///   extend failed: no request is sent;
    /// - [`Error::NotExtended`](crate::Error::NotExtended) when fewer than a quorum extended or no validity was
    ///   left; the lock is then marked lost (see [`lost`](LockStatus::lost));
    /// - [`Error::InvalidTtl`](crate::Error::InvalidTtl) for a bad TTL, before any request; the lock is kept.
    ///
    /// An extend never deletes or creates a key: a lock that expired stays with
    /// whoever took it next.
    ///
    /// # Examples
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use quorumlock::{Error, MemoryInstance, QuorumLocker};
    ///
    /// let redis = MemoryInstance::new("redis");
    /// let locker = QuorumLocker::builder().memory(&redis).build().await?;
    /// let lock = locker.acquire("import", Duration::from_secs(10)).await?;
    /// tokio::time::sleep(Duration::from_secs(8)).await; // a long batch
    /// let validity = lock.extend(Duration::from_secs(10)).await?;
    /// assert!(validity > Duration::from_secs(9));
    ///
    /// redis.remove("import"); // the key is gone, as after an expiry
    /// assert!(matches!(lock.extend(Duration::from_secs(10)).await, Err(Error::NotExtended { .. })));
    /// assert!(!lock.is_valid());
    /// # Ok::<_, quorumlock::Error>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves the lock with its earlier validity, or, for a
    /// shorter TTL than the last one, with the validity the shorter TTL gives
    /// (it is set before the requests leave, since they may still land); the
    /// requests already sent may still extend some instances. Extends of one
    /// lock run one at a time: a second waits for the first, and dropping it
    /// while it waits sends nothing.
    #[doc(alias = "refresh", alias = "renew")]
    pub async fn extend(&self, ttl: Duration) -> crate::Result<Duration> {
        crate::ops::extend::extend(&self.shared, self.status.held(), ttl).await
    }

    /// Lets the lock go without releasing it: the keys stay until their TTL
    /// expires. For "at most once per interval" jobs, where the lock must outlive
    /// the work: take it with a TTL of the interval and leave it to expire.
    pub fn leave_to_expire(mut self) {
        self.release_on_drop = false;
    }

    /// Deletes the key on every instance where it still holds this lock's token,
    /// and returns how many instances released it.
    ///
    /// Returns once every instance has answered, or once a quorum has answered and
    /// at least one released; deletes still in flight on slow instances finish in
    /// the background (see [`QuorumLocker::settle`](crate::QuorumLocker::settle)).
    ///
    /// # Errors
    ///
    /// - [`Error::NotHeld`](crate::Error::NotHeld) when every instance answered and none held the token
    ///   (the lock had expired);
    /// - [`Error::Unavailable`](crate::Error::Unavailable) when none released and some did not answer.
    ///
    /// Where an instance answered with an error (say, a broken connection), the
    /// release is retried in the background while the keys may still exist there,
    /// whatever this returns.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops the lock, which releases it in the background.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use quorumlock::{MemoryInstance, QuorumLocker};
    ///
    /// let redis = MemoryInstance::new("redis");
    /// let locker = QuorumLocker::builder().memory(&redis).build().await?;
    /// let lock = locker.acquire("export", Duration::from_secs(10)).await?;
    /// let released = lock.release().await?;
    /// assert_eq!(released, 1); // instances that deleted the key
    /// # Ok::<_, quorumlock::Error>(())
    /// # }).unwrap();
    /// ```
    #[doc(alias = "unlock")]
    pub async fn release(mut self) -> crate::Result<usize> {
        let released = crate::ops::release::release(
            &self.shared,
            &self.status.held().key,
            &self.status.held().value,
            self.status.held().lease(),
            self.status.held().asked,
            &self.stragglers,
        )
        .await;
        self.status.held().lose(None);
        // Instances that answered with an error may still hold the key: `Drop`
        // tries them again in the background.
        self.release_on_drop = released.incomplete;
        released.result
    }

    pub(crate) fn held(&self) -> &Arc<Held> {
        self.status.held()
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Once per lock, however it ends: released, dropped or left to expire.
        metrics::released(self.acquired_at().elapsed());
        self.status.held().lose(None);
        if !self.release_on_drop {
            return;
        }
        let release = crate::ops::release::release_until_expired(
            Arc::clone(&self.shared),
            Arc::clone(self.status.held()),
            Arc::clone(&self.stragglers),
        );
        if self.shared.background.spawn(release).is_none() {
            warn!(key = %self.status.held().key.user, "lock dropped outside a Tokio runtime: not released, the key expires by its TTL");
        }
    }
}

impl Deref for Lock {
    type Target = LockStatus;

    fn deref(&self) -> &LockStatus {
        &self.status
    }
}

impl fmt::Debug for Lock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock")
            .field("key", &self.key())
            .field(
                "token",
                &format_args!("{}…", token::abbreviate(self.token())),
            )
            .field("fencing_token", &self.fencing_token())
            .field("ttl", &self.ttl())
            .field("remaining", &self.remaining())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    /// Locks and lockers move between tasks and threads.
    #[test]
    fn handles_are_send_and_sync() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<super::Lock>();
        send_sync::<crate::LockGuard>();
        send_sync::<crate::LockStatus>();
        send_sync::<crate::QuorumLocker>();
        send_sync::<crate::Error>();
    }
}
