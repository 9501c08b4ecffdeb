//! Fencing tokens as a quorum register: the first round's `INCR`s propose a
//! token (the largest counter among the granting instances), the second round
//! writes it back to those instances, and the token is handed out only once a
//! quorum has acknowledged it. See the crate docs, "Fencing tokens", for what
//! this guarantees and the argument.

use std::sync::Arc;

use tokio::time::Instant;

use crate::error::Vote;
use crate::fanout::{Asked, Fanout, Tally};
use crate::instance::Request;
pub(crate) use crate::names::fence_key;
use crate::shared::Shared;

/// The token candidate: the largest counter the first round's `INCR`s left
/// among the `granted` instances (0 for none).
pub(crate) fn candidate(first_round: &Fanout, granted: &[usize]) -> u64 {
    granted
        .iter()
        .map(|&index| first_round.count(index))
        .max()
        .unwrap_or(0)
}

/// The second round: raises the counter to `token` on every instance in
/// `granted`, where the lock key still holds `value`. Returns whether a
/// quorum acknowledged, and the fan-out (for its votes).
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
            member.instance.eval(&Request::FenceWriteBack {
                key,
                fence,
                value,
                token,
            })
        } else {
            // Not asked: it does not hold our key, so it cannot acknowledge.
            Box::pin(async { Ok(0) })
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

    #[test]
    fn the_counter_lives_beside_the_lock_key() {
        assert_eq!(fence_key("locks:job").as_ref(), "locks:job:fence");
    }
}
