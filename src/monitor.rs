//! What the locker knows about each instance between operations — which server
//! process it is (`run_id`) and how fast its clock runs — and the background task
//! that keeps it current. Acquisitions consult it to keep a restarted or drifting
//! instance from voting.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use futures_util::future::join_all;
use redis::RedisError;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::clock::RateEstimator;
use crate::error::{Quarantine, Vote};
use crate::instance::{Member, Probe};
use crate::locker::Shared;

/// How soon an instance that failed is probed again, at first.
const SUSPECT_PROBE: Duration = Duration::from_millis(20);

/// One instance's standing.
pub(crate) struct InstanceState {
    inner: Mutex<Standing>,
    /// Wakes the monitor when an instance becomes suspect.
    kick: Arc<Notify>,
}

#[derive(Default)]
struct Standing {
    run_id: Option<String>,
    /// A connection failed since the last probe: the server may have restarted.
    suspect: bool,
    /// Votes do not count until then: the server restarted and forgot its keys.
    quarantined_until: Option<Instant>,
    clock: RateEstimator,
    /// The clock's rate, refitted at each probe: attempts read it, and a fit per
    /// attempt would cost more than the rest of the attempt's bookkeeping.
    rate: Option<f64>,
}

/// How strictly the locker treats instances; from the builder.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    /// How long a restarted instance may not vote; zero turns the check off.
    pub(crate) restart_quarantine: Duration,
    /// Refuse votes from an instance whose clock runs faster than this rate.
    pub(crate) max_clock_rate: Option<f64>,
    /// Shorten validity to what the granting instances' clock rates allow.
    pub(crate) rate_aware_validity: bool,
    /// How often each instance is probed.
    pub(crate) probe_every: Duration,
}

impl InstanceState {
    pub(crate) fn new(kick: Arc<Notify>) -> Self {
        Self {
            inner: Mutex::new(Standing::default()),
            kick,
        }
    }

    fn standing(&self) -> MutexGuard<'_, Standing> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Why the instance may not vote in an acquisition now, if it may not.
    pub(crate) fn refusal(&self, policy: &Policy) -> Option<Vote> {
        let standing = self.standing();
        if let Some(until) = standing.quarantined_until {
            let remaining = until.saturating_duration_since(Instant::now());
            if !remaining.is_zero() {
                return Some(Vote::Quarantined(Quarantine::Restarted { remaining }));
            }
        }
        // Until a probe shows the same server, a failed connection may hide a
        // restart. Only matters when restarts are guarded against at all.
        if standing.suspect && standing.run_id.is_some() && !policy.restart_quarantine.is_zero() {
            return Some(Vote::Quarantined(Quarantine::Unverified));
        }
        if let Some(max) = policy.max_clock_rate {
            if let Some(rate) = standing.rate.filter(|rate| *rate > max) {
                return Some(Vote::Quarantined(Quarantine::ClockDrift { rate }));
            }
        }
        None
    }

    /// An operation on the instance failed. If the connection went, it
    /// reconnects by itself, perhaps to a restarted server: no vote from it until
    /// a probe has seen which server it is.
    pub(crate) fn failed(&self, err: &RedisError) {
        if is_connection_failure(err) {
            self.suspect();
        }
    }

    /// A request failed on the connection: probe the instance soon.
    fn suspect(&self) {
        let mut standing = self.standing();
        if !standing.suspect {
            standing.suspect = true;
            drop(standing);
            self.kick.notify_one();
        }
    }

    pub(crate) fn is_suspect(&self) -> bool {
        self.standing().suspect
    }

    /// The estimated rate of the instance's clock against ours.
    pub(crate) fn clock_rate(&self) -> Option<f64> {
        self.standing().rate
    }

    /// How long the instance stays quarantined after a restart.
    pub(crate) fn quarantine_left(&self) -> Option<Duration> {
        let until = self.standing().quarantined_until?;
        let left = until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Records a probe's answer.
    pub(crate) fn observe(
        &self,
        run_id: &str,
        server_time: Duration,
        sent: Instant,
        received: Instant,
        policy: &Policy,
        address: &str,
    ) {
        let mut standing = self.standing();
        standing.suspect = false;
        match &standing.run_id {
            Some(known) if known != run_id => {
                standing.clock.reset();
                standing.rate = None;
                if !policy.restart_quarantine.is_zero() {
                    // The restart came before we saw it: counting from now errs
                    // on the safe side.
                    standing.quarantined_until = Some(received + policy.restart_quarantine);
                    warn!(%address, quarantine = ?policy.restart_quarantine, "instance restarted: its votes do not count until every lock it held has expired");
                }
            }
            _ => {}
        }
        if standing.run_id.as_deref() != Some(run_id) {
            standing.run_id = Some(run_id.to_string());
        }
        standing.clock.record(sent, received, server_time);
        standing.rate = standing.clock.rate();
    }
}

/// The probing task's handle: how to wake it, and whether it still runs. It runs
/// on the runtime that built the locker; a locker used on after that runtime shut
/// down (a static shared by tests, each with its own runtime) starts it again on
/// the current one, or instances whose connection failed would never be
/// verified again.
pub(crate) struct Monitor {
    kick: Arc<Notify>,
    running: Arc<AtomicBool>,
}

/// Clears the running flag when the task ends or its runtime drops it.
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Monitor {
    pub(crate) fn new(kick: Arc<Notify>) -> Self {
        Self {
            kick,
            running: Arc::new(AtomicBool::new(false)),
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
            runtime.spawn(run(Arc::downgrade(shared), Arc::clone(&self.kick), running));
        }
    }
}

/// Probes every instance now and then (sooner after a failure), until the locker
/// is dropped.
async fn run(shared: Weak<Shared>, kick: Arc<Notify>, _running: Running) {
    // Rounds in a row that left some instance suspect: an instance that stays down
    // is probed less and less often, down to the usual pace.
    let mut suspect_rounds = 0u32;
    loop {
        let Some(locker) = shared.upgrade() else {
            return;
        };
        let policy = locker.settings.policy;
        probe_all(&locker).await;
        let wait = if locker
            .members
            .iter()
            .any(|member| member.state.is_suspect())
        {
            suspect_rounds = suspect_rounds.saturating_add(1);
            SUSPECT_PROBE
                .saturating_mul(1 << suspect_rounds.min(10))
                .min(policy.probe_every)
        } else {
            suspect_rounds = 0;
            policy.probe_every
        };
        // Not held while waiting, so dropping the last locker ends this task.
        drop(locker);
        tokio::select! {
            () = kick.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Probes every member in parallel.
pub(crate) async fn probe_all(shared: &Shared) {
    let timeout = shared.settings.instance_timeout.max(Duration::from_secs(1));
    let policy = shared.settings.policy;
    join_all(
        shared
            .members
            .iter()
            .map(|member| probe(member, timeout, &policy)),
    )
    .await;
}

async fn probe(member: &Member, timeout: Duration, policy: &Policy) {
    match tokio::time::timeout(timeout, probe_once(member, policy)).await {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => debug!(address = %member.address, %err, "probe failed"),
        Err(_) => debug!(address = %member.address, "probe timed out"),
    }
}

/// One probe of `member`, recorded in its standing either way; the answer and
/// its round trip.
pub(crate) async fn probe_once(
    member: &Member,
    policy: &Policy,
) -> Result<(Probe, Duration), RedisError> {
    let sent = Instant::now();
    match member.instance.probe().await {
        Ok(probe) => {
            let received = Instant::now();
            member.state.observe(
                &probe.run_id,
                probe.server_time,
                sent,
                received,
                policy,
                &member.address,
            );
            Ok((probe, received - sent))
        }
        Err(err) => {
            member.state.failed(&err);
            Err(err)
        }
    }
}

/// Whether an error means the connection (and so perhaps the server) went away.
fn is_connection_failure(err: &RedisError) -> bool {
    err.is_io_error() || err.is_connection_dropped() || err.is_connection_refusal()
}
