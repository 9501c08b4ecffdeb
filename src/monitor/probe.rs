//! The background task that keeps every instance's standing current: a probe
//! loop per instance, quicker while an instance lacks a measurement or after a
//! failure, ending when the locker is dropped.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::future::join_all;
use redis::RedisError;
use tokio::time::Instant;
use tracing::debug;

use super::handle::ProbeTask;
use crate::clock::MIN_INTERVAL;
use crate::epoch::Epoch;
use crate::instance::connect::CHECK_TIMEOUT;
use crate::instance::Probe;
use crate::shared::Shared;
use crate::standing::identities::check_identities;
use crate::standing::member::Member;

/// How soon an instance that failed is probed again, at first.
const SUSPECT_PROBE: Duration = Duration::from_millis(20);
/// Starts the probe task unless it runs (on the current runtime: a locker used
/// after the runtime that built it shut down starts it again).
pub(crate) fn ensure_running(shared: &Arc<Shared>) {
    if let Some((runtime, running)) = shared.monitor.claim() {
        runtime.spawn(run(Arc::downgrade(shared), running));
    }
}

/// Marks the warm-up done once no instance is worth waiting for.
fn check_warm(shared: &Shared) {
    if shared.monitor.is_warm() {
        return;
    }
    let policy = &shared.settings.policy;
    let timeout = shared.settings.instance_timeout;
    let waiting = shared
        .members
        .iter()
        .any(|member| member.state.worth_waiting_for(policy, timeout));
    if !waiting {
        shared.monitor.set_warm();
    }
}

/// Probes every instance on its own schedule, until the locker is dropped: a
/// stalled instance must not hold up the others' probes.
async fn run(shared: Weak<Shared>, _running: ProbeTask) {
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
        check_warm(&locker);
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
        let mut closed = locker.monitor.closed();
        drop(locker);
        tokio::select! {
            () = state.kicked() => {}
            () = tokio::time::sleep(wait) => {}
            _ = closed.changed() => {}
        }
    }
}

async fn probe(shared: &Shared, member: &Member, timeout: Duration) -> bool {
    member.state.probing();
    let answer = tokio::time::timeout(timeout, probe_once(shared, member)).await;
    member.state.probed(answer.is_err());
    match answer {
        Ok(Ok(_)) => true,
        Ok(Err(err)) => {
            debug!(address = %member.address, %err, "probe failed");
            false
        }
        Err(_) => {
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
            if let Some(ago) = probe.changed_ago {
                // A change another locker recorded, recent enough that locks
                // of the old server may still be held: the rest of its
                // quarantine, for a locker that never saw the old server.
                let lag = member
                    .instance
                    .failover_lag(shared.settings.policy.probe_every);
                let window = shared.restart_quarantine().saturating_add(lag);
                if ago < window && shared.settings.policy.checks_epoch() {
                    let at = received.checked_sub(ago).unwrap_or(received);
                    member.state.lost_since(at, &member.address);
                }
            }
            Ok((probe, received - sent))
        }
        Err(err) => {
            member.state.probe_failed(&err);
            Err(err)
        }
    }
}
