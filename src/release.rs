//! Release: compare-and-delete on every instance in parallel.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, warn};

use crate::error::Error;
use crate::fanout::Fanout;
use crate::locker::{LockKey, Shared};

/// Deletes `key` where it holds `token`; see [`Lock::release`](crate::Lock::release).
pub(crate) async fn release(
    shared: &Arc<Shared>,
    key: &LockKey,
    token: &Arc<str>,
    ttl: Duration,
) -> crate::Result<usize> {
    let n = shared.members.len();
    let quorum = shared.quorum;
    let timeout = shared.settings.instance_timeout;
    let start = Instant::now();
    let mut fanout = Fanout::start(&shared.members, |instance| {
        instance.release(&key.redis, token)
    });
    // Once a quorum has answered and one released, the rest cannot change what the
    // caller does next; a slow or paused instance must not hold the caller up.
    fanout
        .collect(start + timeout, timeout, |tally| {
            tally.answered() == n || (tally.answered() >= quorum && tally.granted > 0)
        })
        .await;
    let tally = fanout.tally();
    let causes = (tally.granted == 0).then(|| fanout.votes(&shared.members));

    let stragglers = fanout.take_pending();
    if !stragglers.is_empty() {
        let key = Arc::clone(&key.redis);
        let bound = ttl.max(timeout);
        shared.background.spawn(async move {
            let finish = stragglers.into_iter().map(|tagged| {
                let key = Arc::clone(&key);
                async move {
                    let index = tagged.index;
                    match tokio::time::timeout(bound, tagged).await {
                        Ok((_, Ok(_))) => {}
                        Ok((_, Err(err))) => warn!(%key, instance = index, %err, "release failed"),
                        Err(_) => warn!(%key, instance = index, "release timed out"),
                    }
                }
            });
            futures_util::future::join_all(finish).await;
        });
    }

    debug!(key = %key.user, released = tally.granted, answered = tally.answered(), "released");
    match causes {
        None => Ok(tally.granted),
        Some(_) if tally.unreachable == 0 => Err(Error::NotHeld {
            key: key.user.to_string(),
        }),
        Some(causes) => Err(Error::Unavailable {
            operation: "release",
            key: key.user.to_string(),
            causes,
        }),
    }
}
