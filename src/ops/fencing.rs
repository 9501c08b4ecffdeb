//! Fencing tokens as a quorum register: the first round's `INCR`s propose a
//! token (the largest counter among the granting instances), the second round
//! writes it back to those instances, and the token is handed out only once a
//! quorum has acknowledged it. See the crate docs, "Fencing tokens", for what
//! this guarantees and the argument.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::time::Instant;

use crate::error::Vote;
use crate::fanout::{Asked, Fanout, Tally};
use crate::instance::{BoxFuture, Counter, Reply};
use crate::shared::Shared;

/// Appended to a lock's key (after the locker's prefix) to name its fencing
/// counter: `locks:job` counts in `locks:job:fence`.
pub const FENCE_SUFFIX: &str = ":fence";

/// The fencing counter's key for the lock key `redis_key` (prefix included).
pub(crate) fn fence_key(redis_key: &str) -> Arc<str> {
    format!("{redis_key}{FENCE_SUFFIX}").into()
}

/// Each instance's counter from the first round; 0 where it refused or has not
/// answered.
pub(crate) struct Counters(Arc<[AtomicU64]>);

impl Counters {
    pub(crate) fn new(n: usize) -> Self {
        Self((0..n).map(|_| AtomicU64::new(0)).collect())
    }

    /// Turns a first-round answer into a vote, remembering the counter.
    pub(crate) fn record(&self, index: usize, counter: BoxFuture<Counter>) -> BoxFuture<Reply> {
        let counters = Arc::clone(&self.0);
        Box::pin(async move {
            let counter = counter.await?;
            if let Some(slot) = counters.get(index) {
                slot.store(counter, Ordering::Relaxed);
            }
            Ok(counter > 0)
        })
    }

    /// The token candidate: the largest counter among `granted` instances (0
    /// for none).
    pub(crate) fn candidate(&self, granted: impl IntoIterator<Item = usize>) -> u64 {
        granted
            .into_iter()
            .filter_map(|index| self.0.get(index))
            .map(|counter| counter.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }
}

/// The second round: raises the counter to `token` on every instance in
/// `granted`, where the lock key still holds `value`. Returns the tally and
/// the fanout (for its votes); won once a quorum acknowledged.
pub(crate) async fn write_back(
    shared: &Arc<Shared>,
    key: &Arc<str>,
    fence: &Arc<str>,
    value: &Arc<str>,
    token: u64,
    granted: &[usize],
) -> (bool, Fanout) {
    let quorum = shared.quorum;
    let timeout = shared.settings.instance_timeout;
    let start = Instant::now();
    let mut fanout = Fanout::start(shared, Asked::ALL, |member| {
        if granted.contains(&member.index) {
            member.instance.fence_write_back(key, fence, value, token)
        } else {
            // Not asked: it does not hold our key, so it cannot acknowledge.
            Box::pin(async { Ok(false) })
        }
    });
    fanout.collect_until_decided(start + timeout, timeout).await;
    let Tally { granted: acks, .. } = fanout.tally();
    (acks >= quorum, fanout)
}

/// Whether the instance granted in `fanout`.
pub(crate) fn granted(fanout: &Fanout, index: usize) -> bool {
    matches!(fanout.vote(index), Some(Vote::Granted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_candidate_is_the_largest_granting_counter() {
        let counters = Counters::new(4);
        for (index, counter) in [(0, 7), (1, 0), (2, 3), (3, 9)] {
            let reply = counters
                .record(index, Box::pin(async move { Ok(counter) }))
                .await;
            assert_eq!(reply.unwrap(), counter > 0);
        }
        assert_eq!(counters.candidate([0, 2]), 7);
        assert_eq!(counters.candidate([0, 2, 3]), 9);
        assert_eq!(counters.candidate([1]), 0);
        assert_eq!(counters.candidate([]), 0);
        assert_eq!(fence_key("locks:job").as_ref(), "locks:job:fence");
    }
}
