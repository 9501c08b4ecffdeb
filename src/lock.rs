//! The lock handle: proof of ownership of one key.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::fanout::Straggler;
use crate::locker::{LockKey, Shared};
use crate::token;

/// A lock held on a quorum of instances, returned by
/// [`QuorumLocker::acquire`](crate::QuorumLocker::acquire) and
/// [`try_acquire`](crate::QuorumLocker::try_acquire).
///
/// The lock is yours until [`valid_until`](Self::valid_until) on this process's
/// monotonic clock, provided the timing assumptions in the crate docs hold. Release
/// it with [`release`](Self::release) when the work is done. Dropping it without
/// releasing leaves the key in Redis until its TTL expires.
#[must_use = "a lock that is dropped stays taken until its TTL expires; call `release`"]
pub struct Lock {
    shared: Arc<Shared>,
    key: LockKey,
    token: Arc<str>,
    ttl: Duration,
    acquired_at: Instant,
    valid_until: Instant,
    /// Sets of the winning attempt that were still in flight when it was decided.
    stragglers: Vec<Straggler>,
}

impl Lock {
    pub(crate) fn new(
        shared: Arc<Shared>,
        key: LockKey,
        token: Arc<str>,
        ttl: Duration,
        acquired_at: Instant,
        valid_until: Instant,
        stragglers: Vec<Straggler>,
    ) -> Self {
        Self {
            shared,
            key,
            token,
            ttl,
            acquired_at,
            valid_until,
            stragglers,
        }
    }

    /// The key as given to `acquire` (without the locker's key prefix).
    pub fn key(&self) -> &str {
        &self.key.user
    }

    /// The random token that marks this owner's value in Redis (32 hex digits).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The TTL the lock was taken with.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// When the winning attempt started; the validity is counted from here.
    pub fn acquired_at(&self) -> Instant {
        self.acquired_at
    }

    /// The end of the validity: `acquired_at + ttl − drift allowance`. Past it, the
    /// lock may be held by someone else.
    pub fn valid_until(&self) -> Instant {
        self.valid_until
    }

    /// The validity left now (zero once expired).
    pub fn remaining(&self) -> Duration {
        self.valid_until.saturating_duration_since(Instant::now())
    }

    /// Whether validity is left.
    pub fn is_valid(&self) -> bool {
        !self.remaining().is_zero()
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
    /// - [`Error::NotHeld`](crate::Error::NotHeld) when every instance answered and
    ///   none held the token (the lock had expired);
    /// - [`Error::Unavailable`](crate::Error::Unavailable) when none released and
    ///   some did not answer.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future after its first poll still lets the deletes already
    /// sent run on the servers; the lock otherwise expires by its TTL.
    pub async fn release(self) -> crate::Result<usize> {
        crate::release::release(
            &self.shared,
            &self.key,
            &self.token,
            self.ttl,
            &self.stragglers,
        )
        .await
    }
}

impl fmt::Debug for Lock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock")
            .field("key", &self.key.user)
            .field(
                "token",
                &format_args!("{}…", token::abbreviate(&self.token)),
            )
            .field("ttl", &self.ttl)
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
        send_sync::<crate::QuorumLocker>();
        send_sync::<crate::Error>();
    }
}
