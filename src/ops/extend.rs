//! Extend: compare-and-pexpire on every instance in parallel, counted against the
//! quorum and timed from its own start, exactly like an acquire.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::field::Empty;
use tracing::{debug, debug_span, Instrument, Span};

use crate::error::{Error, Shortfall, Vote};
use crate::fanout::{Asked, Fanout};
use crate::instance::Request;
use crate::lease::Lease;
use crate::metrics;
use crate::ops::held::Held;
use crate::ops::lifetime::granted_lifetime;
use crate::quorum::Decision;
use crate::shared::Shared;
use crate::token;

/// A failed extend, and whether the lock is certainly gone.
pub(crate) struct ExtendError {
    pub(crate) error: Error,
    /// More than `N − quorum` instances refused: the key is no longer ours on
    /// enough of them for any later extend to succeed. Otherwise the shortfall came
    /// from instances that did not answer, or from a slow round.
    pub(crate) certain: bool,
}

/// [`Lock::extend`](crate::Lock::extend): any failure loses the lock.
pub(crate) async fn extend(
    shared: &Arc<Shared>,
    held: &Held,
    ttl: Duration,
) -> crate::Result<Duration> {
    match try_extend(shared, held, ttl).await {
        Ok(validity) => Ok(validity),
        Err(ExtendError { error, .. }) => {
            if matches!(error, Error::NotExtended { .. }) {
                metrics::lost("extend_refused");
                held.lose(None);
            }
            Err(error)
        }
    }
}

/// One extend round, leaving the decision to lose the lock to the caller.
pub(crate) async fn try_extend(
    shared: &Arc<Shared>,
    held: &Held,
    ttl: Duration,
) -> Result<Duration, ExtendError> {
    let span = debug_span!(
        "extend",
        key = %held.key.user,
        token = %token::abbreviate(&held.token),
        granted = Empty,
        failed = Empty,
        validity_ms = Empty,
    );
    let result = extend_round(shared, held, ttl).instrument(span).await;
    metrics::extended(match &result {
        Ok(_) => "extended",
        Err(failure) if failure.certain => "refused",
        Err(_) => "inconclusive",
    });
    result
}

async fn extend_round(
    shared: &Arc<Shared>,
    held: &Held,
    ttl: Duration,
) -> Result<Duration, ExtendError> {
    let refuse = |error| ExtendError {
        error,
        certain: true,
    };
    let lease = Lease::new(ttl, shared.settings.drift_factor).map_err(|error| ExtendError {
        error,
        certain: false,
    })?;
    if held.is_lost() {
        return Err(refuse(Error::LockLost {
            key: held.key.user.to_string(),
            source: None,
        }));
    }
    // One extend of this lock at a time (see `Held::extending`). Waiting here
    // sends nothing, so a future dropped while it waits changes nothing.
    let _one_at_a_time = held.extending.lock().await;
    if held.is_lost() {
        return Err(refuse(Error::LockLost {
            key: held.key.user.to_string(),
            source: None,
        }));
    }
    let n = shared.members.len();
    let quorum = shared.quorum;
    let timeout = shared.settings.instance_timeout;
    let (ttl, ttl_ms) = (lease.ttl(), lease.px());
    shared.note_ttl(ttl);

    let start = Instant::now();
    held.sending(start, lease);
    if ttl < held.ttl() {
        // A shorter TTL may land on some instances even if this call is dropped
        // or fails: believe no more than the shortest it can leave there.
        let shortest = shortest_lifetime(shared, held.asked, ttl);
        held.cap(lease.valid_until(start, shortest));
    }
    // Every locker learns the longest TTL on each server from there.
    let epoch_key = shared
        .settings
        .policy
        .checks_epoch()
        .then_some(&shared.settings.epoch_key);
    let mut fanout = Fanout::start(shared, held.asked, |member| {
        member.instance.eval(&Request::Extend {
            key: &held.key.redis,
            value: &held.value,
            ttl_ms,
            epoch_key,
        })
    });
    fanout.collect_until_decided(start + timeout, timeout).await;
    let elapsed = start.elapsed();
    let tally = fanout.tally();
    let span = Span::current();
    span.record("granted", tally.granted);
    span.record("failed", tally.denied);
    fanout.finish_in_background(&held.key.redis, lease.bound(timeout), "extend");

    let shortfall = match fanout.decision() {
        Decision::Won => {
            let lifetime = granted_lifetime(shared, &fanout, ttl);
            match lease.validity(lifetime, elapsed) {
                Some(validity) => {
                    held.renew(lease, lease.valid_until(start, lifetime));
                    span.record("validity_ms", validity.as_millis() as u64);
                    debug!("lock extended");
                    return Ok(validity);
                }
                None => Shortfall::ValidityExhausted { elapsed },
            }
        }
        Decision::Lost | Decision::Open => Shortfall::TooFewVotes {
            granted: tally.granted,
            needed: quorum,
        },
    };
    let causes = fanout.votes();
    let refused = causes
        .iter()
        .filter(|cause| matches!(cause.vote, Vote::Refused))
        .count();
    span.record("validity_ms", 0u64);
    debug!(%shortfall, refused, "extend fell short");
    Err(ExtendError {
        error: Error::NotExtended {
            key: held.key.user.to_string(),
            shortfall,
            causes,
        },
        certain: refused > n - quorum,
    })
}

/// How long, from now, a key given `ttl` lasts on the fastest of the `asked`
/// instances (an instance whose clock is not measured may drop it at once).
fn shortest_lifetime(shared: &Shared, asked: Asked, ttl: Duration) -> Duration {
    if !shared.settings.policy.rate_aware_validity {
        return ttl;
    }
    let fastest = shared
        .members
        .iter()
        .filter(|member| asked.contains(member.index))
        .map(|member| member.state.clock_rate_bound().unwrap_or(f64::INFINITY))
        .fold(1.0, f64::max);
    ttl.div_f64(fastest)
}
