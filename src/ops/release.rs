//! Release: compare-and-delete on every instance in parallel.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::field::Empty;
use tracing::{debug, debug_span, Instrument, Span};

use crate::error::{Error, Vote};
use crate::fanout::{Asked, Fanout, Straggler};
use crate::handoff;
use crate::instance::Request;
use crate::lease::Lease;
use crate::ops::held::Held;
use crate::shared::{LockKey, Shared};
use crate::value::LockValue;

/// The first pause between the releases of a dropped lock that met errors.
const FIRST_RETRY: Duration = Duration::from_millis(10);
/// The longest pause between them.
const MAX_RETRY: Duration = Duration::from_secs(1);
/// Rounds after the first: with the pauses above, about 2.5 s of trying. An
/// instance down longer than that has most likely lost the key with its process;
/// one that comes back with it on disk drops it by its TTL.
const RETRIES: u32 = 8;

/// How a release round ended.
pub(crate) struct Released {
    pub(crate) result: crate::Result<usize>,
    /// Some instance answered with an error, so the key may still be there: worth
    /// another round. (Deletes that timed out are still in flight and finish in
    /// the background.)
    pub(crate) incomplete: bool,
}

/// Deletes `key` where it holds `value`; see [`Lock::release`](crate::Lock::release).
pub(crate) async fn release(
    shared: &Arc<Shared>,
    key: &LockKey,
    value: &Arc<str>,
    lease: Lease,
    asked: Asked,
    stragglers: &[Straggler],
) -> Released {
    let span = debug_span!("release", key = %key.user, released = Empty);
    release_round(shared, key, value, lease, asked, stragglers)
        .instrument(span)
        .await
}

async fn release_round(
    shared: &Arc<Shared>,
    key: &LockKey,
    value: &Arc<str>,
    lease: Lease,
    asked: Asked,
    stragglers: &[Straggler],
) -> Released {
    let n = shared.members.len();
    let quorum = shared.quorum;
    let timeout = shared.settings.instance_timeout;
    let start = Instant::now();
    let bound = lease.bound(timeout);
    // With hand-off, the release also tells waiters; the message is the nonce,
    // never the token (which may be a caller's reusable secret).
    let publish = shared.handoff.as_ref().map(|_| {
        let nonce = LockValue::parse(value).map_or("", |value| value.nonce);
        (handoff::channel(&key.redis), Arc::<str>::from(nonce))
    });
    let mut fanout = Fanout::start(shared, asked, |member| {
        let delete = member.instance.eval(&Request::Release {
            key: &key.redis,
            value,
            publish: publish
                .as_ref()
                .map(|(channel, message)| (channel, message)),
        });
        match stragglers
            .iter()
            .find(|straggler| straggler.index == member.index)
        {
            None => delete,
            // The acquisition's set may not have left yet: delete only after it.
            Some(straggler) => {
                let set = straggler.reply.clone();
                Box::pin(async move {
                    let _ = tokio::time::timeout(bound, set).await;
                    delete.await
                })
            }
        }
    });
    // Once a quorum has answered and one released, the rest cannot change what the
    // caller does next; a slow or paused instance must not hold the caller up.
    fanout
        .collect(start + timeout, timeout, |tally| {
            tally.answered() == n || (tally.answered() >= quorum && tally.granted > 0)
        })
        .await;
    let tally = fanout.tally();
    if let (Some(handoff), true) = (&shared.handoff, tally.granted > 0) {
        handoff.released(&key.redis);
    }
    let incomplete = (0..n).any(|index| matches!(fanout.vote(index), Some(Vote::Failed(_))));
    let causes = (tally.granted == 0).then(|| fanout.votes());

    fanout.finish_in_background(&key.redis, bound, "release");

    Span::current().record("released", tally.granted);
    debug!(answered = tally.answered(), "released");
    let result = match causes {
        None => Ok(tally.granted),
        Some(_) if tally.unreachable == 0 => Err(Error::NotHeld {
            key: key.user.to_string(),
        }),
        Some(causes) => Err(Error::Unavailable {
            operation: "release",
            key: key.user.to_string(),
            causes,
        }),
    };
    Released { result, incomplete }
}

/// The release of a lock dropped without one: repeated with doubling pauses while
/// instances answer with errors — at most [`RETRIES`] more times, and never past
/// the moment the keys expire by their TTL anyway.
pub(crate) async fn release_until_expired(
    shared: Arc<Shared>,
    held: Arc<Held>,
    stragglers: Arc<[Straggler]>,
) {
    // A key expires `ttl` after the server applied the last set or extend, which is
    // after the request left: allow for its trip and for a fast server clock.
    let lease = held.lease();
    let expired = held.expires_at() + shared.settings.instance_timeout + lease.drift();
    let mut pause = FIRST_RETRY;
    for round in 0..=RETRIES {
        let released = release(
            &shared,
            &held.key,
            &held.value,
            lease,
            held.asked,
            &stragglers,
        )
        .await;
        if !released.incomplete {
            return;
        }
        let next = Instant::now() + pause;
        if round == RETRIES || next >= expired {
            debug!(key = %held.key.user, "giving up the release of a dropped lock: the instances that failed drop it by its TTL");
            return;
        }
        tokio::time::sleep_until(next).await;
        pause = (pause * 2).min(MAX_RETRY);
    }
}
