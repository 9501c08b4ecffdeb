//! The lock client a scenario drives: the seam another Redlock implementation
//! fills to run the same workload, and this crate's locker behind it. Apart from
//! the run, which only calls it.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::{Scenario, PREFIX};
use crate::{Builder, Error, QuorumLocker};

/// A lock client that a [`Scenario`] drives in place of [`QuorumLocker`]
/// ([`Scenario::run_with`]), so that another Redlock implementation runs the same
/// workload under the same faults and the same [`Checker`].
///
/// [`Checker`]: crate::testing::Checker
pub trait ScenarioClient: Sized + Clone + Send + Sync + 'static {
    /// A held lock.
    type Held: Send + 'static;

    /// One of the scenario's clients, over `urls` (through the fault proxies where
    /// the fault has them); `None` if it cannot be built.
    fn connect(scenario: &Scenario, urls: &[String]) -> impl Future<Output = Option<Self>> + Send;

    /// Takes `key` (stored as [`Scenario::KEY_PREFIX`] then `key`) for `ttl`,
    /// retrying until `wait` has passed. Returns the lock and the end of its
    /// validity on this process's clock.
    fn acquire(
        &self,
        key: &str,
        ttl: Duration,
        wait: Duration,
    ) -> impl Future<Output = Result<(Self::Held, Instant), Failure>> + Send;

    /// Releases a lock (best effort).
    fn release(&self, held: Self::Held) -> impl Future<Output = ()> + Send;

    /// Waits until the client's background work has finished.
    fn settle(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Why a [`ScenarioClient::acquire`] call returned without a lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// Not acquired: contention, or too few instances granted.
    NotAcquired,
    /// Any other error.
    Other,
}

/// The scenarios' own locker: the library's defaults (a fresh locker, no
/// warm-up), and without [`Scenario::defences`] plain Redlock validity and no
/// quarantine.
impl ScenarioClient for QuorumLocker {
    type Held = crate::Lock;

    async fn connect(scenario: &Scenario, urls: &[String]) -> Option<Self> {
        let mut builder: Builder = QuorumLocker::builder()
            .urls(urls.iter().cloned())
            .default_ttl(scenario.ttl)
            .instance_timeout(scenario.instance_timeout)
            .key_prefix(PREFIX);
        if !scenario.defences {
            builder = builder
                .rate_aware_validity(false)
                .restart_quarantine(Duration::ZERO);
        }
        // Settings are this module's own and valid. No `prepare()`: the first
        // acquisitions meet the locker's start-up, as a service's would.
        builder.build().await.ok()
    }

    async fn acquire(
        &self,
        key: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<(Self::Held, Instant), Failure> {
        match self.lock(key).ttl(ttl).wait(wait).acquire().await {
            Ok(held) => {
                let until = held.valid_until();
                Ok((held, until))
            }
            Err(Error::NotAcquired { .. }) => Err(Failure::NotAcquired),
            Err(_) => Err(Failure::Other),
        }
    }

    async fn release(&self, held: Self::Held) {
        let _ = held.release().await;
    }

    async fn settle(&self) {
        QuorumLocker::settle(self).await;
    }
}
