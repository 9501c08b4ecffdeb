//! What the locker knows about each instance between operations — which server
//! process it is (`run_id`) and how fast its clock runs — and the background task
//! that keeps it current. Acquisitions consult it to keep a restarted or drifting
//! instance from voting.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use futures_util::future::join_all;
use redis::RedisError;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::builder::CHECK_TIMEOUT;
use crate::clock::{RateEstimator, MIN_INTERVAL};
use crate::epoch::{self, Epoch};
use crate::error::{Quarantine, Vote};
use crate::instance::{Member, Probe};
use crate::locker::Shared;

/// How soon an instance that failed is probed again, at first.
const SUSPECT_PROBE: Duration = Duration::from_millis(20);
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
    /// last (see `after_loss`).
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

/// How strictly the locker treats instances; from the builder.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    /// How long an instance that lost its keys may not vote at least; zero turns
    /// the checks off. The longest TTL set on the servers is used where it is
    /// longer (`Shared::restart_quarantine`).
    pub(crate) restart_quarantine: Duration,
    /// Refuse votes from an instance whose clock runs faster than this rate.
    pub(crate) max_clock_rate: Option<f64>,
    /// Shorten validity to what the granting instances' clock rates allow.
    pub(crate) rate_aware_validity: bool,
    /// How often each instance is probed.
    pub(crate) probe_every: Duration,
}

impl Policy {
    /// Whether grants are checked against the data set's epoch.
    pub(crate) fn checks_epoch(&self) -> bool {
        !self.restart_quarantine.is_zero()
    }

    /// Whether an instance needs a measured clock before it votes.
    fn needs_clock(&self) -> bool {
        self.rate_aware_validity || self.max_clock_rate.is_some()
    }
}

/// Whether instance `index`, which lost its keys at `lost_at`, may vote again:
/// the quarantine has passed (how long is left, if not; it lasts the longest
/// TTL any locker has set on these servers as read now, so it grows as
/// readings come in), and `N − quorum + 1` other instances were read since
/// (any lock held across the loss was granted by at least `quorum − 1` others,
/// so that many reads meet one of them, and the quarantine knows its TTL).
/// Read only where an instance is quarantined: the usual attempt pays nothing.
fn after_loss(shared: &Shared, index: usize, lost_at: Instant) -> Result<(), Duration> {
    let quarantine = shared.restart_quarantine();
    let remaining = (lost_at + quarantine).saturating_duration_since(Instant::now());
    if !remaining.is_zero() {
        return Err(remaining);
    }
    let reads = shared
        .members
        .iter()
        .filter(|member| member.index != index)
        .filter(|member| {
            member
                .state
                .standing()
                .probed_at
                .is_some_and(|at| at > lost_at)
        })
        .count();
    let needed = shared.members.len() - shared.quorum + 1;
    if reads < needed {
        return Err(Duration::ZERO);
    }
    Ok(())
}

/// What an instance may be asked to grant with: the identity its grants must
/// find (none when the restart check is off).
pub(crate) type Admission = Option<Verified>;

/// The identity a grant must find: the epoch hash's id and the `run_id`; and
/// the longest TTL last read there (a longer grant raises it).
#[derive(Debug, Clone)]
pub(crate) struct Verified {
    pub(crate) epoch: Arc<str>,
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
    pub(crate) fn admit(&self, shared: &Shared, index: usize) -> Result<Admission, Vote> {
        let policy = &shared.settings.policy;
        let refuse = |why| Err(Vote::Quarantined(why));
        // Read without holding this instance's lock: `after_loss` reads the
        // others'.
        let lost_at = self.standing().lost_at;
        if let Some(lost_at) = lost_at {
            if let Err(remaining) = after_loss(shared, index, lost_at) {
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
                epoch: Arc::clone(epoch),
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
    fn suspect(&self) {
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
    fn is_unmeasured(&self, policy: &Policy) -> bool {
        let standing = self.standing();
        !standing.identity_checked || (policy.needs_clock() && standing.rate_bound.is_none())
    }

    /// Whether a new locker's first attempt should wait for this instance:
    /// it answers, and lacks a measurement it needs. One that failed its last
    /// probe, or whose probe has been out longer than an attempt would wait for
    /// it, would not vote anyway.
    fn worth_waiting_for(&self, policy: &Policy, instance_timeout: Duration) -> bool {
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
    fn needs_scripts(&self) -> bool {
        let standing = self.standing();
        standing.run_id.is_some() && !standing.scripts_loaded
    }

    fn scripts_loaded(&self) {
        self.standing().scripts_loaded = true;
    }

    /// The longest TTL any locker has set on the server, as last read.
    pub(crate) fn longest_ttl(&self) -> Duration {
        self.standing().longest_ttl
    }

    fn identity(&self) -> (Option<Arc<str>>, Option<Arc<str>>) {
        let standing = self.standing();
        (standing.run_id.clone(), standing.epoch.clone())
    }

    /// Records the outcome of comparing `identity` with the other members'.
    fn checked(
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
            standing.rate = None;
            standing.rate_bound = None;
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
        standing.rate_bound = standing.clock.bound();
        standing.rate = standing.clock.rate();
    }
}

/// One request in flight to an instance, counted until dropped.
pub(crate) struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Compares every member's identity with the others': the later of two members
/// with one `run_id` or one data set is a second name for the same server (or a
/// replica of it) and must not vote.
pub(crate) fn check_identities(members: &[Member]) {
    let identities: Vec<_> = members
        .iter()
        .map(|member| member.state.identity())
        .collect();
    for (index, identity) in identities.iter().enumerate() {
        let same = |other: &(Option<Arc<str>>, Option<Arc<str>>)| {
            (identity.0.is_some() && identity.0 == other.0)
                || (identity.1.is_some() && identity.1 == other.1)
        };
        let duplicate_of = identities[..index].iter().position(same);
        if let Some(first) = duplicate_of {
            warn!(address = %members[index].address, first = %members[first].address, "two instances are one server: the second does not vote");
        }
        members[index].state.checked(identity, duplicate_of);
    }
}

/// The probing task's handle: whether it still runs, and whether its first
/// measurements are in. It runs on the runtime that built the locker; a locker
/// used on after that runtime shut down (a static shared by tests, each with its
/// own runtime) starts it again on the current one, or instances whose
/// connection failed would never be verified again.
pub(crate) struct Monitor {
    running: Arc<AtomicBool>,
    /// Set once every instance has a measured clock or does not answer, or
    /// once [`WARM_UP`] has passed: a new locker's first attempt waits for it.
    warm: watch::Sender<bool>,
    /// Dropped with the locker: wakes the probe loops to end.
    closed: watch::Sender<()>,
}

/// The longest a new locker's first attempt waits for the clocks to be
/// measured: enough for a connection and a few probes [`MIN_INTERVAL`] apart.
pub(crate) const WARM_UP: Duration = Duration::from_secs(2);

/// Clears the running flag when the task ends or its runtime drops it.
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Monitor {
    pub(crate) fn new() -> Self {
        Self {
            running: Arc::new(AtomicBool::new(false)),
            warm: watch::Sender::new(false),
            closed: watch::Sender::new(()),
        }
    }

    /// Starts the task unless it runs; one atomic load when it does.
    pub(crate) fn ensure_running(&self, shared: &Arc<Shared>) {
        if self.running.load(Ordering::Acquire) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self
            .running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let running = Running(Arc::clone(&self.running));
            runtime.spawn(run(Arc::downgrade(shared), running));
        }
    }

    /// Waits, at most [`WARM_UP`], for the first measurements of every
    /// instance: an instance votes only once its identity and clock are known,
    /// and without the wait a new locker's first attempt would find none.
    pub(crate) async fn warmed_up(&self) {
        if *self.warm.borrow() {
            return;
        }
        let mut warm = self.warm.subscribe();
        let _ = tokio::time::timeout(WARM_UP, warm.wait_for(|warm| *warm)).await;
        self.warm.send_replace(true);
    }

    /// Marks the warm-up done once no instance is worth waiting for.
    fn check_warm(&self, shared: &Shared) {
        if *self.warm.borrow() {
            return;
        }
        let policy = &shared.settings.policy;
        let timeout = shared.settings.instance_timeout;
        let waiting = shared
            .members
            .iter()
            .any(|member| member.state.worth_waiting_for(policy, timeout));
        if !waiting {
            self.warm.send_replace(true);
        }
    }
}

/// Probes every instance on its own schedule, until the locker is dropped: a
/// stalled instance must not hold up the others' probes.
async fn run(shared: Weak<Shared>, _running: Running) {
    let count = shared.upgrade().map_or(0, |shared| shared.members.len());
    join_all((0..count).map(|index| probe_loop(Weak::clone(&shared), index))).await;
}

/// Probes one instance now and then: sooner after a failure, and at the
/// quicker pace of [`MIN_INTERVAL`] while it lacks a measurement.
async fn probe_loop(shared: Weak<Shared>, index: usize) {
    // Failed probes in a row: an instance that stays down is probed less and
    // less often, down to the usual pace.
    let mut failures = 0u32;
    loop {
        let Some(locker) = shared.upgrade() else {
            return;
        };
        let Some(member) = locker.members.get(index) else {
            return;
        };
        let state = Arc::clone(&member.state);
        let policy = locker.settings.policy;
        let timeout = locker.settings.instance_timeout.max(CHECK_TIMEOUT);
        let answered = probe(&locker, member, timeout).await;
        if answered && state.needs_scripts() {
            // Loaded ahead of the first lock and after every restart: a
            // `NOSCRIPT` answer costs two more round trips, past the instance
            // timeout on a slow link.
            if let Ok(Ok(_)) = tokio::time::timeout(timeout, member.instance.load_scripts()).await {
                state.scripts_loaded();
            }
        }
        check_identities(&locker.members);
        locker.monitor.check_warm(&locker);
        let mut wait = policy.probe_every;
        if state.is_suspect() || !answered {
            failures = failures.saturating_add(1);
            wait = SUSPECT_PROBE
                .saturating_mul(1 << failures.min(10))
                .min(wait);
        } else {
            failures = 0;
        }
        if answered && state.is_unmeasured(&policy) {
            // Samples closer than this are not kept.
            wait = wait.min(MIN_INTERVAL);
        }
        // Not held while waiting, so dropping the last locker ends this task,
        // at once: the sender goes with it.
        let mut closed = locker.monitor.closed.subscribe();
        drop(locker);
        tokio::select! {
            () = state.kick.notified() => {}
            () = tokio::time::sleep(wait) => {}
            _ = closed.changed() => {}
        }
    }
}

async fn probe(shared: &Shared, member: &Member, timeout: Duration) -> bool {
    member.state.standing().probing_since = Some(Instant::now());
    let answer = tokio::time::timeout(timeout, probe_once(shared, member)).await;
    let mut standing = member.state.standing();
    standing.probing_since = None;
    match answer {
        Ok(Ok(_)) => true,
        Ok(Err(err)) => {
            drop(standing);
            debug!(address = %member.address, %err, "probe failed");
            false
        }
        Err(_) => {
            standing.unreachable = true;
            drop(standing);
            debug!(address = %member.address, "probe timed out");
            false
        }
    }
}

/// One probe of `member`, recorded in its standing either way; the answer and
/// its round trip. The caller compares identities afterwards
/// ([`check_identities`]).
pub(crate) async fn probe_once(
    shared: &Shared,
    member: &Member,
) -> Result<(Probe, Duration), RedisError> {
    let candidate = Epoch::generate()?;
    let sent = Instant::now();
    match member
        .instance
        .probe(&shared.settings.epoch_key, &candidate)
        .await
    {
        Ok(probe) => {
            let received = Instant::now();
            member.state.observe(
                &probe,
                sent,
                received,
                shared.settings.policy.checks_epoch(),
                &member.address,
            );
            Ok((probe, received - sent))
        }
        Err(err) => {
            // Any failed probe, not only a broken connection: a server that
            // answers READONLY, say, is a replica now, perhaps mid-failover.
            member.state.suspect();
            let mut standing = member.state.standing();
            standing.probe_error = Some(err.clone());
            standing.unreachable = true;
            drop(standing);
            Err(err)
        }
    }
}

/// Whether an error means the connection (and so perhaps the server) went away.
fn is_connection_failure(err: &RedisError) -> bool {
    err.is_io_error() || err.is_connection_dropped() || err.is_connection_refusal()
}
