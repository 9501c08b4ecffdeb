//! Metrics through the `metrics` facade (cargo feature `metrics`): the
//! library records, the application installs whatever exporter it likes
//! (Prometheus, OpenTelemetry, …). Without the feature every function here is
//! empty and compiles away. Names and labels are listed in the README
//! ("Metrics").
#![cfg_attr(not(feature = "metrics"), allow(dead_code))]

use std::time::Duration;

use crate::error::Vote;
#[cfg(feature = "metrics")]
use crate::error::{Error, Shortfall};

// The names, documented in the README's table ("Metrics"); without the
// feature nothing reads them.
const ACQUIRES: &str = "quorumlock_acquires_total";
const ACQUIRE_SECONDS: &str = "quorumlock_acquire_seconds";
const ACQUIRE_ATTEMPTS: &str = "quorumlock_acquire_attempts";
const VALIDITY_SECONDS: &str = "quorumlock_validity_at_grant_seconds";
const EXTENDS: &str = "quorumlock_extends_total";
const LOST: &str = "quorumlock_locks_lost_total";
const HOLD_SECONDS: &str = "quorumlock_hold_seconds";
const REPLIES: &str = "quorumlock_instance_replies_total";
const REPLY_SECONDS: &str = "quorumlock_instance_reply_seconds";
const QUARANTINED: &str = "quorumlock_quarantined_instances";
const BACKGROUND: &str = "quorumlock_background_tasks";

/// How an acquire call ended, as its `outcome` label says it.
#[cfg(feature = "metrics")]
fn acquire_outcome<T>(result: &crate::Result<T>) -> &'static str {
    match result {
        Ok(_) => "won",
        Err(Error::NotAcquired {
            shortfall, causes, ..
        }) => match shortfall {
            Shortfall::ValidityExhausted { .. } => "validity_exhausted",
            // Someone else's key refused it somewhere: contention; otherwise
            // the instances were out of reach (or not admitted).
            _ if causes
                .iter()
                .any(|cause| matches!(cause.vote, Vote::Refused)) =>
            {
                "contended"
            }
            _ => "unreachable",
        },
        Err(_) => "error",
    }
}

/// An acquire call (all its attempts) ended with `result` after `elapsed`.
pub(crate) fn acquired<T>(result: &crate::Result<T>, elapsed: Duration, attempts: u32) {
    #[cfg(feature = "metrics")]
    {
        let outcome = acquire_outcome(result);
        metrics::counter!(ACQUIRES, "outcome" => outcome).increment(1);
        metrics::histogram!(ACQUIRE_SECONDS, "outcome" => outcome).record(elapsed.as_secs_f64());
        metrics::histogram!(ACQUIRE_ATTEMPTS).record(f64::from(attempts));
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (result, elapsed, attempts);
}

/// A won attempt's validity when it was decided.
pub(crate) fn granted(validity: Duration) {
    #[cfg(feature = "metrics")]
    metrics::histogram!(VALIDITY_SECONDS).record(validity.as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = validity;
}

/// An extend round ended: `extended`, `refused` (the lock is lost) or
/// `inconclusive` (too few answers; the lock is at risk).
pub(crate) fn extended(outcome: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!(EXTENDS, "outcome" => outcome).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = outcome;
}

/// A lock was lost while held: `extend_refused` or `watchdog` (its extends
/// could not get through before the validity ran out).
pub(crate) fn lost(reason: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!(LOST, "reason" => reason).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = reason;
}

/// A lock was released (or dropped) after being held for `held`.
pub(crate) fn released(held: Duration) {
    #[cfg(feature = "metrics")]
    metrics::histogram!(HOLD_SECONDS).record(held.as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = held;
}

/// Instance `address` answered a fan-out with `vote` after `elapsed`.
pub(crate) fn replied(address: &str, vote: &Vote, elapsed: Duration) {
    #[cfg(feature = "metrics")]
    {
        let vote = match vote {
            Vote::Granted => "granted",
            Vote::Refused => "refused",
            Vote::Failed(_) => "failed",
            Vote::TimedOut(_) => "timed_out",
            Vote::Unanswered => "unanswered",
            Vote::Quarantined(_) => "quarantined",
        };
        let instance = address.to_string();
        metrics::counter!(REPLIES, "instance" => instance.clone(), "vote" => vote).increment(1);
        metrics::histogram!(REPLY_SECONDS, "instance" => instance).record(elapsed.as_secs_f64());
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (address, vote, elapsed);
}

/// How many instances an attempt found quarantined (not admitted to vote).
pub(crate) fn quarantined(count: usize) {
    #[cfg(feature = "metrics")]
    metrics::gauge!(QUARANTINED).set(count as f64);
    #[cfg(not(feature = "metrics"))]
    let _ = count;
}

/// Background tasks (rollbacks, releases of stragglers) running now.
pub(crate) fn background(running: usize) {
    #[cfg(feature = "metrics")]
    metrics::gauge!(BACKGROUND).set(running as f64);
    #[cfg(not(feature = "metrics"))]
    let _ = running;
}
