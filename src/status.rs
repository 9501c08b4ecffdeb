//! The public, cloneable view of a held lock's state.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::ops::held::Held;
use crate::token;

/// A cloneable live view of a held lock: its key, token and validity, and a future
/// that resolves when the lock is lost. [`QuorumLocker::with_lock`] hands one to the
/// work it runs; [`Lock::status`] and [`LockGuard::status`] make more.
///
/// [`QuorumLocker::with_lock`]: crate::QuorumLocker::with_lock
/// [`Lock::status`]: crate::Lock::status
/// [`LockGuard::status`]: crate::LockGuard::status
#[derive(Clone)]
pub struct LockStatus {
    held: Arc<Held>,
}

impl LockStatus {
    pub(crate) fn new(held: Arc<Held>) -> Self {
        Self { held }
    }

    /// The key as given to `acquire` (without the locker's key prefix).
    pub fn key(&self) -> &str {
        &self.held.key.user
    }

    /// The token that marks this owner's value in Redis.
    pub fn token(&self) -> &str {
        &self.held.token
    }

    /// The metadata stored beside the token, if any.
    pub fn metadata(&self) -> Option<&str> {
        self.held.metadata()
    }

    /// The fencing token of a fenced lock; see [`Lock::fencing_token`](crate::Lock::fencing_token).
    pub fn fencing_token(&self) -> Option<u64> {
        self.held.fencing_token()
    }

    /// The end of the validity on this process's monotonic clock; extends move it.
    pub fn valid_until(&self) -> Instant {
        self.held.valid_until()
    }

    /// The validity left now: zero once it has run out, or once the lock was lost
    /// or released.
    pub fn remaining(&self) -> Duration {
        self.held.remaining()
    }

    /// Whether the lock is still valid.
    pub fn is_valid(&self) -> bool {
        !self.held.is_lost()
    }

    /// Resolves when the lock is no longer valid: its validity ran out, an extend
    /// failed, or it was released. Resolves at once if that has already happened.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: it only waits.
    pub async fn lost(&self) {
        self.held.lost().await;
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
