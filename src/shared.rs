//! What a locker, its locks and its background tasks share: the members, the
//! quorum, the validated settings, and the locker-wide facts the quorum's
//! defences read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::background::Background;
use crate::error::Error;
use crate::handoff::Handoff;
use crate::lease::Lease;
use crate::monitor::handle::Monitor;
use crate::names;
use crate::retry::RetryPolicy;
use crate::standing::member::Member;
use crate::standing::policy::Policy;

/// What a locker and its locks share.
pub(crate) struct Shared {
    pub(crate) members: Vec<Member>,
    pub(crate) quorum: usize,
    pub(crate) settings: Settings,
    pub(crate) background: Background,
    /// Wakes waits at releases, with `Builder::wake_waiters`.
    pub(crate) handoff: Option<Handoff>,
    /// The task that probes the instances.
    pub(crate) monitor: Monitor,
    /// The longest TTL this locker has sent, in milliseconds: a restarted
    /// instance may have held a lock that long.
    pub(crate) longest_ttl_ms: AtomicU64,
}

impl Shared {
    /// Notes a TTL about to be sent to the instances.
    pub(crate) fn note_ttl(&self, ttl: Duration) {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        self.longest_ttl_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// How long an instance that lost its keys may not vote: the configured
    /// quarantine, or the longest TTL any locker has set on these servers where
    /// that is longer (zero when the check is off).
    pub(crate) fn restart_quarantine(&self) -> Duration {
        let configured = self.settings.policy.restart_quarantine;
        if configured.is_zero() {
            return Duration::ZERO;
        }
        // Ours, and every other locker's as the servers keep it (the restarted
        // one has lost its own count; the others have theirs).
        let ours = Duration::from_millis(self.longest_ttl_ms.load(Ordering::Relaxed));
        let theirs = self
            .members
            .iter()
            .map(|member| member.state.longest_ttl())
            .max()
            .unwrap_or_default();
        configured.max(ours).max(theirs)
    }

    /// Validates a TTL before any I/O, with this locker's drift factor.
    pub(crate) fn lease(&self, ttl: Duration) -> crate::Result<Lease> {
        Lease::new(ttl, self.settings.drift_factor)
    }

    /// Validates a key before any I/O; the key as stored, with the prefix.
    pub(crate) fn lock_key(&self, key: &str) -> crate::Result<LockKey> {
        if key.is_empty() {
            return Err(Error::EmptyKey);
        }
        let redis = format!("{}{key}", self.settings.key_prefix);
        // Under any prefix: another locker's epoch hash or fencing counter may
        // live there.
        if names::is_reserved(&redis) {
            return Err(Error::ReservedKey {
                key: key.to_string(),
            });
        }
        #[cfg(feature = "cluster")]
        if self.settings.clustered && crate::slot::companion(&redis, names::FENCE_SUFFIX).is_none()
        {
            return Err(Error::KeyNotForCluster {
                key: key.to_string(),
            });
        }
        Ok(LockKey {
            user: key.into(),
            redis: redis.into(),
        })
    }

    /// Whether instance `index`, which lost its keys at `lost_at`, may vote again:
    /// the quarantine has passed (how long is left, if not; it lasts the longest
    /// TTL any locker has set on these servers as read now, so it grows as
    /// readings come in), and `N − quorum + 1` other instances that kept their
    /// keys were read since (any lock held across the loss was granted by at
    /// least `quorum − 1` others, so at most `N − quorum` of the others that
    /// kept their keys did not grant it, and that many reads meet one that
    /// did: the quarantine knows its TTL). An instance that lost its keys too
    /// forgot the TTLs of the locks it held, so its read tells nothing until
    /// its own quarantine has ended (which took such reads: the quarantine
    /// then knows what it forgot). Read only where an instance is quarantined:
    /// the usual attempt pays nothing.
    pub(crate) fn after_loss(&self, index: usize, lost_at: Instant) -> Result<(), Duration> {
        let lag = self.members.get(index).map_or(Duration::ZERO, |member| {
            member
                .instance
                .failover_lag(self.settings.policy.probe_every)
        });
        let quarantine = self.restart_quarantine().saturating_add(lag);
        let remaining = (lost_at + quarantine).saturating_duration_since(Instant::now());
        if !remaining.is_zero() {
            return Err(remaining);
        }
        let (mut kept, mut reads) = (0, 0);
        for member in &self.members {
            if member.index == index || member.state.lost_keys() {
                continue;
            }
            kept += 1;
            if member.state.read_since(lost_at) {
                reads += 1;
            }
        }
        // Never more than there are others that kept their keys: a lone
        // instance has no one to ask, and where at least a quorum lost their
        // keys no one may know a lock's TTL; the quarantine (the longest TTL
        // read so far, or the configured one) is then all there is to go by.
        let needed = (self.members.len() - self.quorum + 1).min(kept);
        if reads < needed {
            return Err(Duration::ZERO);
        }
        Ok(())
    }
}

/// The builder's settings, validated.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) default_ttl: Duration,
    pub(crate) drift_factor: f64,
    pub(crate) instance_timeout: Duration,
    pub(crate) retry: RetryPolicy,
    pub(crate) default_wait: Duration,
    pub(crate) key_prefix: String,
    /// The key prefix followed by [`EPOCH_KEY`].
    pub(crate) epoch_key: Arc<str>,
    pub(crate) policy: Policy,
    /// A member is a Redis Cluster: lock keys must fit one (see
    /// [`Error::KeyNotForCluster`]).
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) clustered: bool,
}

/// A key as the caller gave it, and as stored in Redis (with the prefix).
#[derive(Debug, Clone)]
pub(crate) struct LockKey {
    pub(crate) user: Arc<str>,
    pub(crate) redis: Arc<str>,
}
