//! One instance's standing: which server process it is (`run_id`) and which
//! data set (the epoch), how fast its clock runs, whether a failure left it
//! suspect, what is in flight to it; and whether it may vote now.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use redis::RedisError;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::warn;

use super::policy::Policy;
use crate::clock::RateEstimator;
use crate::epoch;
use crate::error::{Quarantine, Vote};
use crate::instance::{is_connection_failure, Probe};

/// Requests to one instance still waiting for a reply beyond which it is not
/// asked to grant new locks: a stalled instance would otherwise collect the
/// background work of every cycle until it answers.
pub(crate) const MAX_IN_FLIGHT: usize = 1024;

/// One instance's standing.
pub(crate) struct InstanceState {
    inner: Mutex<Standing>,
    /// Wakes the instance's probe loop when it becomes suspect.
    kick: Notify,
    /// Requests sent and not yet answered (or given up on).
    in_flight: Arc<AtomicUsize>,
}

#[derive(Default)]
struct Standing {
    run_id: Option<Arc<str>>,
    /// The data set's identity (see `epoch`): it changes when the server loses
    /// its keys, whatever the connection saw.
    epoch: Option<Arc<str>>,
    /// When a request failed in a way that may hide a restart; cleared only by
    /// a probe sent after it.
    suspect_since: Option<Instant>,
    /// When the locker saw that the server lost its keys (restarted, flushed,
    /// failed over): no votes until the quarantine from then has passed, and
    /// enough other instances were read since to know how long their locks
    /// last (see `Shared::after_loss`).
    lost_at: Option<Instant>,
    /// When the last probe that answered was sent.
    probed_at: Option<Instant>,
    /// The Lua scripts are loaded on the server behind `run_id`.
    scripts_loaded: bool,
    /// An earlier member with the same `run_id` or data set: this one would vote
    /// twice for one server.
    duplicate_of: Option<usize>,
    /// The longest TTL any locker has set on the server, the most ever read.
    longest_ttl: Duration,
    /// The same, as last read: a grant for longer raises it.
    last_read_ttl: Duration,
    /// The identity above has been compared with every other member's.
    identity_checked: bool,
    clock: RateEstimator,
    /// The other servers' clocks, by `run_id`, for a member of several (see
    /// `Probe::other_clocks`).
    other_clocks: Vec<(Arc<str>, RateEstimator)>,
    /// The bound on the clock's rate, refitted at each probe: attempts read it,
    /// and a fit per attempt would cost more than the rest of the attempt's
    /// bookkeeping.
    rate_bound: Option<f64>,
    /// The rate itself, for reports and the fast-clock quarantine.
    rate: Option<f64>,
    /// Why the last probe failed, while no probe has identified the server: an
    /// attempt reports it instead of a bare "unidentified".
    probe_error: Option<RedisError>,
    /// The last probe failed or timed out.
    unreachable: bool,
    /// When the probe now out was sent.
    probing_since: Option<Instant>,
}

impl Standing {
    /// Records the other servers' clocks; a server no longer in the probe
    /// (a primary gone from the cluster) is forgotten.
    fn record_others(&mut self, clocks: &[(Arc<str>, Duration)], sent: Instant, received: Instant) {
        self.other_clocks
            .retain(|(id, _)| clocks.iter().any(|(other, _)| other == id));
        for (id, time) in clocks {
            let index = match self.other_clocks.iter().position(|(known, _)| known == id) {
                Some(index) => index,
                None => {
                    self.other_clocks
                        .push((Arc::clone(id), RateEstimator::default()));
                    self.other_clocks.len() - 1
                }
            };
            self.other_clocks[index].1.record(sent, received, *time);
        }
    }

    /// The bound on the fastest clock: a member's lock may sit on any of its
    /// servers. None until every server's clock has one.
    fn rate_bound(&self) -> Option<f64> {
        self.other_clocks
            .iter()
            .map(|(_, clock)| clock.bound())
            .try_fold(self.clock.bound()?, |fastest, bound| {
                Some(fastest.max(bound?))
            })
    }

    /// The fastest clock's rate, where measured.
    fn rate(&self) -> Option<f64> {
        self.other_clocks
            .iter()
            .filter_map(|(_, clock)| clock.rate())
            .fold(self.clock.rate(), |fastest, rate| {
                Some(fastest.map_or(rate, |f| f.max(rate)))
            })
    }
}

/// What an instance may be asked to grant with: the identity its grants must
/// find (none when the restart check is off).
pub(crate) type Admission = Option<Verified>;

/// The identity a grant must find: the epoch hash's id and the `run_id`; and
/// the longest TTL last read there (a longer grant raises it).
#[derive(Debug, Clone)]
pub(crate) struct Verified {
    pub(crate) epoch_id: Arc<str>,
    pub(crate) run_id: Arc<str>,
    pub(crate) last_read_ttl: Duration,
}

impl InstanceState {
    pub(crate) fn new() -> Self {
        Self {
            inner: Mutex::new(Standing::default()),
            kick: Notify::new(),
            in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn standing(&self) -> MutexGuard<'_, Standing> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a request until the returned guard drops.
    pub(crate) fn in_flight(&self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(&self.in_flight))
    }

    /// Whether the instance may be asked to grant a lock now, and with which
    /// epoch; or why it may not.
    ///
    /// `after_loss(lost_at)` says whether an instance that lost its keys at
    /// `lost_at` may vote again (how long is left, if not): that takes the
    /// other members' standing, which the caller has (`Shared::after_loss`).
    pub(crate) fn admit(
        &self,
        policy: &Policy,
        after_loss: impl FnOnce(Instant) -> Result<(), Duration>,
    ) -> Result<Admission, Vote> {
        let refuse = |why| Err(Vote::Quarantined(why));
        // Read without holding this instance's lock: `after_loss` reads the
        // others'.
        let lost_at = self.standing().lost_at;
        if let Some(lost_at) = lost_at {
            if let Err(remaining) = after_loss(lost_at) {
                // Zero: a long lock held across the loss may be known only to
                // the others not read since.
                return refuse(Quarantine::Restarted { remaining });
            }
        }
        let mut standing = self.standing();
        if standing.lost_at == lost_at {
            standing.lost_at = None;
        } else if standing.lost_at.is_some() {
            // A loss seen meanwhile: the next attempt weighs it.
            return refuse(Quarantine::Restarted {
                remaining: Duration::ZERO,
            });
        }
        // Until a probe has said which server this is, it may be a second name
        // for another member, or a restarted server.
        if standing.run_id.is_none() {
            if let Some(err) = &standing.probe_error {
                return Err(Vote::Failed(err.clone()));
            }
        }
        if standing.run_id.is_none() || !standing.identity_checked {
            return refuse(Quarantine::Unidentified);
        }
        if let Some(first) = standing.duplicate_of {
            return refuse(Quarantine::Duplicate { of: first });
        }
        // Until a probe shows the same server, a failed connection may hide a
        // restart. Only matters when restarts are guarded against at all.
        if standing.suspect_since.is_some() && policy.checks_epoch() {
            return refuse(Quarantine::Unverified);
        }
        if policy.needs_clock() && standing.rate_bound.is_none() {
            return refuse(Quarantine::ClockUnmeasured);
        }
        if let Some(max) = policy.max_clock_rate {
            if let Some(rate) = standing.rate.filter(|rate| *rate > max) {
                return refuse(Quarantine::ClockDrift { rate });
            }
        }
        if self.in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            return refuse(Quarantine::Backlog {
                in_flight: MAX_IN_FLIGHT,
            });
        }
        if !policy.checks_epoch() {
            return Ok(None);
        }
        match (&standing.epoch, &standing.run_id) {
            (Some(epoch), Some(run_id)) => Ok(Some(Verified {
                epoch_id: Arc::clone(epoch),
                run_id: Arc::clone(run_id),
                last_read_ttl: standing.last_read_ttl,
            })),
            _ => refuse(Quarantine::Unidentified),
        }
    }

    /// An operation on the instance failed. If the connection went, it
    /// reconnects by itself, perhaps to a restarted server: no vote from it until
    /// a probe sent after this has seen which server it is.
    pub(crate) fn failed(&self, err: &RedisError) {
        if is_connection_failure(err) || epoch::is_changed(err) {
            self.suspect();
        }
    }

    /// A request failed on the connection: probe the instance soon. Each
    /// failure moves the moment a clearing probe must follow, so a probe sent
    /// between two failures clears neither.
    pub(crate) fn suspect(&self) {
        let mut standing = self.standing();
        let first = standing.suspect_since.is_none();
        standing.suspect_since = Some(Instant::now());
        drop(standing);
        if first {
            self.kick.notify_one();
        }
    }

    pub(crate) fn is_suspect(&self) -> bool {
        self.standing().suspect_since.is_some()
    }

    /// Whether the instance still lacks a measurement it needs before it votes
    /// (its identity, or its clock's bound): the monitor probes it at a quicker
    /// pace until it has them.
    pub(crate) fn is_unmeasured(&self, policy: &Policy) -> bool {
        let standing = self.standing();
        !standing.identity_checked || (policy.needs_clock() && standing.rate_bound.is_none())
    }

    /// Whether a new locker's first attempt should wait for this instance:
    /// it answers, and lacks a measurement it needs. One that failed its last
    /// probe, or whose probe has been out longer than an attempt would wait for
    /// it, would not vote anyway.
    pub(crate) fn worth_waiting_for(&self, policy: &Policy, instance_timeout: Duration) -> bool {
        if !self.is_unmeasured(policy) {
            return false;
        }
        let standing = self.standing();
        let stalled = standing
            .probing_since
            .is_some_and(|since| since.elapsed() > instance_timeout);
        !standing.unreachable && !stalled
    }

    /// The estimated rate of the instance's clock against ours.
    pub(crate) fn clock_rate(&self) -> Option<f64> {
        self.standing().rate
    }

    /// The upper bound on the clock's rate that validity is computed from.
    pub(crate) fn clock_rate_bound(&self) -> Option<f64> {
        self.standing().rate_bound
    }

    /// How long the instance stays quarantined after a restart, with
    /// quarantines lasting `quarantine` now.
    pub(crate) fn quarantine_left(&self, quarantine: Duration) -> Option<Duration> {
        let lost_at = self.standing().lost_at?;
        let left = (lost_at + quarantine).saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Whether the scripts still need loading on the server behind it.
    pub(crate) fn needs_scripts(&self) -> bool {
        let standing = self.standing();
        standing.run_id.is_some() && !standing.scripts_loaded
    }

    pub(crate) fn scripts_loaded(&self) {
        self.standing().scripts_loaded = true;
    }

    /// The longest TTL any locker has set on the server, as last read.
    pub(crate) fn longest_ttl(&self) -> Duration {
        self.standing().longest_ttl
    }

    pub(crate) fn identity(&self) -> (Option<Arc<str>>, Option<Arc<str>>) {
        let standing = self.standing();
        (standing.run_id.clone(), standing.epoch.clone())
    }

    /// Records the outcome of comparing `identity` with the other members'.
    pub(crate) fn checked(
        &self,
        identity: &(Option<Arc<str>>, Option<Arc<str>>),
        duplicate_of: Option<usize>,
    ) {
        let mut standing = self.standing();
        // A probe may have changed it since: then the next comparison decides.
        if standing.run_id == identity.0 && standing.epoch == identity.1 {
            standing.duplicate_of = duplicate_of;
            standing.identity_checked = true;
        }
    }

    /// Records a probe's answer; with `guard_restarts`, a server that lost its
    /// keys is quarantined.
    pub(crate) fn observe(
        &self,
        probe: &Probe,
        sent: Instant,
        received: Instant,
        guard_restarts: bool,
        address: &str,
    ) {
        let mut standing = self.standing();
        standing.probe_error = None;
        standing.unreachable = false;
        // Only a probe sent after the failure says anything about the server
        // behind the connection now.
        if standing.suspect_since.is_some_and(|since| since <= sent) {
            standing.suspect_since = None;
        }
        let restarted = standing
            .run_id
            .as_deref()
            .is_some_and(|known| known != probe.run_id);
        let lost_keys = standing
            .epoch
            .as_deref()
            .is_some_and(|known| known != &*probe.epoch);
        if restarted {
            standing.clock.reset();
            standing.other_clocks.clear();
            standing.rate = None;
            standing.rate_bound = None;
            // Measured afresh at the quicker pace, also when a health check
            // (not the probe loop) saw the restart.
            self.kick.notify_one();
        }
        if (restarted || lost_keys) && guard_restarts {
            // The loss came before we saw it: counting from now errs on the safe
            // side.
            standing.lost_at = Some(received);
            warn!(%address, restarted, "instance lost its keys (restart, flush or failover): its votes do not count until every lock it held has expired");
        }
        if standing.run_id.as_deref() != Some(&*probe.run_id) {
            standing.run_id = Some(probe.run_id.as_str().into());
            standing.identity_checked = false;
            standing.scripts_loaded = false;
        }
        // The most ever read: a restarted server starts its count afresh, but
        // the locks it held may still be out there.
        standing.longest_ttl = standing.longest_ttl.max(probe.longest_ttl);
        standing.last_read_ttl = probe.longest_ttl;
        standing.probed_at = Some(sent);
        if standing.epoch.as_deref() != Some(&*probe.epoch) {
            standing.epoch = Some(Arc::clone(&probe.epoch));
            standing.identity_checked = false;
        }
        standing.clock.record(sent, received, probe.server_time);
        standing.record_others(&probe.other_clocks, sent, received);
        standing.rate_bound = standing.rate_bound();
        standing.rate = standing.rate();
    }

    /// The server's own record says it changed (lost what its old self
    /// held) at `at`: quarantined from then, unless a later loss was seen.
    pub(crate) fn lost_since(&self, at: Instant, address: &str) {
        let mut standing = self.standing();
        if standing.lost_at.is_none_or(|known| known < at) {
            if standing.lost_at.is_none() {
                warn!(%address, "instance's record shows a recent failover: its votes do not count until every lock its old primary held has expired");
            }
            standing.lost_at = Some(at);
        }
    }

    /// Whether the instance lost its keys and has not voted since (its
    /// quarantine has not been seen to end).
    pub(crate) fn lost_keys(&self) -> bool {
        self.standing().lost_at.is_some()
    }

    /// Whether a probe that answered was sent after `at`.
    pub(crate) fn read_since(&self, at: Instant) -> bool {
        self.standing().probed_at.is_some_and(|probed| probed > at)
    }

    /// Resolves when the instance becomes suspect: its probe loop wakes early.
    pub(crate) async fn kicked(&self) {
        self.kick.notified().await;
    }

    /// A probe is out from now on.
    pub(crate) fn probing(&self) {
        self.standing().probing_since = Some(Instant::now());
    }

    /// The probe out is over; `timed_out` if it had no answer in time.
    pub(crate) fn probed(&self, timed_out: bool) {
        let mut standing = self.standing();
        standing.probing_since = None;
        if timed_out {
            standing.unreachable = true;
        }
    }

    /// A probe failed with `err`: any failure, not only a broken connection
    /// (a server that answers READONLY, say, is a replica now, perhaps
    /// mid-failover), makes the instance suspect.
    pub(crate) fn probe_failed(&self, err: &RedisError) {
        self.suspect();
        let mut standing = self.standing();
        standing.probe_error = Some(err.clone());
        standing.unreachable = true;
    }
}

/// One request in flight to an instance, counted until dropped.
pub(crate) struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
