//! One acquisition attempt, and the rollback that follows a lost (or abandoned)
//! attempt on every instance that may hold our token.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use futures_util::stream::FuturesUnordered;
use futures_util::FutureExt;
use tokio::time::Instant;
use tracing::field::Empty;
use tracing::{debug, debug_span, warn, Instrument, Span};

use super::lifetime::{granted_lifetime, potential_lifetime};
use crate::epoch::Epoch;
use crate::error::{InstanceVote, Shortfall, Vote};
use crate::fanout::{Fanout, Straggler, Tagged};
use crate::instance::Request;
use crate::lease::Lease;
use crate::metrics;
use crate::monitor::probe::ensure_running;
use crate::ops::fencing;
use crate::ops::held::Held;
use crate::quorum::Decision;
use crate::shared::{LockKey, Shared};
use crate::token;
use crate::value;

/// How an attempt ended.
pub(crate) enum Outcome {
    Won(Grant),
    Lost {
        shortfall: Shortfall,
        causes: Vec<InstanceVote>,
    },
}

/// A won attempt: the held lock's state, and the replies still in flight
/// that its release must wait for. The caller wraps it in a `Lock` at once,
/// with no await between: its drop releases.
pub(crate) struct Grant {
    pub(crate) held: Arc<Held>,
    pub(crate) stragglers: Arc<[Straggler]>,
}

/// Who is asking: the caller's own token, if chosen, and the metadata to store.
pub(crate) struct Identity {
    pub(crate) token: Option<Arc<str>>,
    pub(crate) metadata: Option<Arc<str>>,
    /// Whether the lock gets a fencing token (see `fencing`).
    pub(crate) fenced: bool,
}

/// An attempt in flight. Dropping it before it is won — because it was lost, or
/// because the caller's future was dropped at the await — rolls it back.
struct Attempt {
    shared: Arc<Shared>,
    key: Arc<str>,
    value: Arc<str>,
    lease: Lease,
    fanout: Fanout,
    /// Won, or already rolled back: nothing left for `Drop`.
    settled: bool,
}

/// Makes attempt number `number` to take `key` for `lease`.
pub(crate) async fn attempt(
    shared: &Arc<Shared>,
    key: &LockKey,
    lease: Lease,
    identity: &Identity,
    number: u32,
) -> crate::Result<Outcome> {
    ensure_running(shared);
    // A new locker trusts no instance until it has seen which server it is and
    // measured its clock: the first attempt waits for that (about 85 ms).
    shared.monitor.warmed_up().await;
    let token = match &identity.token {
        Some(token) => Arc::clone(token),
        None => token::generate()?,
    };
    // Fresh for every attempt, even with a chosen token: a rollback of an earlier
    // attempt, still running, must not delete what a later one set.
    let value = value::compose(&token, identity.metadata.as_deref())?;
    let span = debug_span!(
        "attempt",
        key = %key.user,
        attempt = number,
        token = %token::abbreviate(&token),
        granted = Empty,
        failed = Empty,
        validity_ms = Empty,
    );
    run(shared, key, lease, identity, token, value)
        .instrument(span)
        .await
}

async fn run(
    shared: &Arc<Shared>,
    key: &LockKey,
    lease: Lease,
    identity: &Identity,
    token: Arc<str>,
    value: Arc<str>,
) -> crate::Result<Outcome> {
    let n = shared.members.len();
    let quorum = shared.quorum;
    let timeout = shared.settings.instance_timeout;
    let (ttl, ttl_ms) = (lease.ttl(), lease.px());
    let retake = identity.token.is_some();
    let fence = identity.fenced.then(|| fencing::fence_key(&key.redis));

    shared.note_ttl(ttl);
    let epoch_key = &shared.settings.epoch_key;

    let start = Instant::now();
    let mut attempt = Attempt {
        shared: Arc::clone(shared),
        key: Arc::clone(&key.redis),
        fanout: Fanout::start_gated(shared, |member, admission| {
            let instance = &member.instance;
            let epoch = admission.as_ref().map(|verified| Epoch {
                key: Arc::clone(epoch_key),
                id: Arc::clone(&verified.epoch_id),
                run_id: (!instance.sees_reconnects()).then(|| Arc::clone(&verified.run_id)),
                raise: ttl > verified.last_read_ttl,
            });
            instance.eval(&Request::Grant {
                key: &key.redis,
                value: &value,
                ttl_ms,
                retake: retake.then_some(&token),
                fence: fence.as_ref(),
                epoch: epoch.as_ref(),
            })
        }),
        value,
        lease,
        settled: false,
    };
    let deadline = start + timeout;
    attempt
        .fanout
        .collect_until_decided(deadline, timeout)
        .await;
    if attempt.fanout.decision() == Decision::Won {
        await_longer_lifetime(shared, &mut attempt.fanout, lease, deadline).await;
    }
    let elapsed = start.elapsed();
    let tally = attempt.fanout.tally();
    let span = Span::current();
    span.record("granted", tally.granted);
    span.record("failed", tally.denied);

    let mut causes = None;
    let shortfall = match attempt.fanout.decision() {
        Decision::Won => {
            let lifetime = granted_lifetime(shared, &attempt.fanout, ttl);
            match lease.validity(lifetime, elapsed) {
                Some(_) => {
                    // A fenced attempt has a second round; its validity still
                    // counts from the first round's start.
                    let fencing_token = match &fence {
                        None => Ok(None),
                        Some(fence) => {
                            let granted: Vec<usize> = (0..n)
                                .filter(|&index| fencing::granted(&attempt.fanout, index))
                                .collect();
                            // Every grant counted at least 1, so a quorum's
                            // candidate is never 0.
                            let candidate = fencing::candidate(&attempt.fanout, &granted);
                            let (written, round) = fencing::write_back(
                                shared,
                                &key.redis,
                                fence,
                                &attempt.value,
                                candidate,
                                &granted,
                            )
                            .await;
                            let valid = lease.validity(lifetime, start.elapsed());
                            if written && valid.is_some() && candidate > 0 {
                                Ok(Some(candidate))
                            } else {
                                causes = Some(round.votes());
                                Err(Shortfall::FenceNotWritten {
                                    acknowledged: round.tally().granted,
                                    needed: quorum,
                                })
                            }
                        }
                    };
                    match fencing_token {
                        Ok(fencing_token) => {
                            return Ok(won(
                                shared,
                                &mut attempt,
                                key,
                                token,
                                start,
                                lifetime,
                                fencing_token,
                            ))
                        }
                        Err(shortfall) => shortfall,
                    }
                }
                None => Shortfall::ValidityExhausted { elapsed },
            }
        }
        // `collect` returns only once decided, timed out or fully answered, and a
        // timed-out or fully answered attempt that did not win has lost.
        Decision::Lost | Decision::Open => Shortfall::TooFewVotes {
            granted: tally.granted,
            needed: quorum,
        },
    };
    span.record("validity_ms", 0u64);
    let causes = causes.unwrap_or_else(|| attempt.fanout.votes());
    debug!(%shortfall, "attempt lost");
    attempt.roll_back();
    Ok(Outcome::Lost { shortfall, causes })
}

/// Settles a won attempt into a lock whose keys last `lifetime` from `start`.
fn won(
    shared: &Arc<Shared>,
    attempt: &mut Attempt,
    key: &LockKey,
    token: Arc<str>,
    start: Instant,
    lifetime: Duration,
    fencing_token: Option<u64>,
) -> Outcome {
    attempt.settled = true;
    let span = Span::current();
    let valid_until = attempt.lease.valid_until(start, lifetime);
    let validity = valid_until.saturating_duration_since(Instant::now());
    span.record("validity_ms", validity.as_millis() as u64);
    metrics::granted(validity);
    debug!(elapsed = ?start.elapsed(), fencing_token, "lock acquired");
    let stragglers = finish_in_background(shared, attempt.fanout.take_pending(), attempt.lease);
    let held = Held::new(
        key.clone(),
        token,
        Arc::clone(&attempt.value),
        attempt.lease,
        start,
        valid_until,
        attempt.fanout.asked(),
    );
    if let Some(fencing_token) = fencing_token {
        held.set_fencing_token(fencing_token);
    }
    Outcome::Won(Grant {
        held: Arc::new(held),
        stragglers: stragglers.into(),
    })
}

/// A won attempt whose first grants include fast clocks holds for less than the
/// instances still out could make it hold: waits for their replies while the
/// lifetime they may add exceeds the time waited, and while the gain is worth
/// more than the drift allowance (so clocks that run true never wait). With 2
/// of 5 clocks fast, the first three grants often include one and halve the
/// lifetime; the two true clocks' grants, a moment later, restore it.
async fn await_longer_lifetime(
    shared: &Shared,
    fanout: &mut Fanout,
    lease: Lease,
    deadline: Instant,
) {
    let (ttl, worth) = (lease.ttl(), lease.drift());
    loop {
        let current = granted_lifetime(shared, fanout, ttl);
        // Nothing to gain where the grants already last (nearly) the TTL: the
        // usual case, decided without looking at the instances still out.
        if ttl.saturating_sub(current) <= worth {
            return;
        }
        let potential = potential_lifetime(shared, fanout, ttl);
        let gain = potential.saturating_sub(current);
        if gain <= worth {
            return;
        }
        let until = (Instant::now() + gain).min(deadline);
        let granted = fanout.tally().granted;
        fanout
            .wait_a_little(until, |tally| tally.granted > granted)
            .await;
        if fanout.tally().granted == granted || Instant::now() >= until {
            return;
        }
    }
}

impl Attempt {
    /// Starts the rollback in the background, once.
    fn roll_back(&mut self) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let may_hold: Vec<usize> = (0..self.shared.members.len())
            .filter(|&index| {
                matches!(
                    self.fanout.vote(index),
                    Some(Vote::Granted | Vote::Failed(_))
                )
            })
            .collect();
        let in_flight = self.fanout.take_pending();
        if may_hold.is_empty() && in_flight.is_empty() {
            return;
        }
        let rollback = roll_back(
            Arc::clone(&self.shared),
            Arc::clone(&self.key),
            Arc::clone(&self.value),
            self.lease,
            may_hold,
            in_flight,
        );
        if self.shared.background.spawn(rollback).is_none() {
            warn!(key = %self.key, "attempt dropped outside a Tokio runtime: no rollback, the key expires by its TTL");
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.roll_back();
    }
}

/// Finishes a won attempt's sets still in flight: they make the held lock survive
/// more instance failures, and a connection still opening would never send them
/// if they were dropped. The lock's release waits for each before deleting there,
/// so a late set cannot land after the delete.
fn finish_in_background(
    shared: &Arc<Shared>,
    in_flight: FuturesUnordered<Tagged>,
    lease: Lease,
) -> Vec<Straggler> {
    let stragglers: Vec<Straggler> = in_flight
        .into_iter()
        .map(|tagged| Straggler {
            index: tagged.index,
            reply: tagged.shared(),
        })
        .collect();
    if !stragglers.is_empty() {
        let finish: Vec<_> = stragglers
            .iter()
            .map(|straggler| tokio::time::timeout(lease.ttl(), straggler.reply.clone()))
            .collect();
        shared.background.spawn(async move {
            join_all(finish).await;
        });
    }
    stragglers
}

/// Removes our token from every instance that granted or failed, and from every
/// instance whose reply is still in flight once that reply arrives (or once the
/// wait for it gives up: on a multiplexed connection the delete is queued behind
/// the set, so it still lands after it).
async fn roll_back(
    shared: Arc<Shared>,
    key: Arc<str>,
    value: Arc<str>,
    lease: Lease,
    may_hold: Vec<usize>,
    in_flight: FuturesUnordered<Tagged>,
) {
    // Past the TTL a set that did land has expired by itself: waiting longer buys
    // nothing. Never wait less than one instance timeout.
    let bound = lease.bound(shared.settings.instance_timeout);
    let delete = |index: usize| {
        let shared = Arc::clone(&shared);
        let key = Arc::clone(&key);
        let value = Arc::clone(&value);
        async move {
            let Some(member) = shared.members.get(index) else {
                return;
            };
            let release = Request::Release {
                key: &key,
                value: &value,
                publish: None,
            };
            match tokio::time::timeout(bound, member.instance.eval(&release)).await {
                Ok(Ok(_)) => {}
                Ok(Err(err)) => {
                    member.state.failed(&err);
                    warn!(%key, instance = index, address = %member.address, %err, "rollback failed")
                }
                Err(_) => {
                    warn!(%key, instance = index, address = %member.address, "rollback timed out")
                }
            }
        }
    };
    let now = may_hold.into_iter().map(delete);
    let later = in_flight.into_iter().map(|tagged| async move {
        let index = tagged.index;
        let refused = matches!(tokio::time::timeout(bound, tagged).await, Ok((_, Ok(0))));
        if !refused {
            delete(index).await;
        }
    });
    let _: (Vec<()>, Vec<()>) = futures_util::future::join(join_all(now), join_all(later)).await;
}
