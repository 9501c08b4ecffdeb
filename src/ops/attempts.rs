//! The attempt loop behind every acquire: attempts, paced by the retry policy
//! and by release wake-ups, until one is won or the wait is over.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::acquire::{self, Grant, Identity, Outcome};
use super::pacing::Pacing;
use crate::error::Error;
use crate::handoff;
use crate::lease::Lease;
use crate::metrics;
use crate::retry::RetryPolicy;
use crate::shared::{LockKey, Shared};

/// Attempts to take `key` for `lease` until one is won, the retry policy has no
/// more delays, or the next retry would come after `wait`; between attempts,
/// with `Builder::wake_waiters`, a release of the key wakes the wait early.
pub(crate) async fn acquire(
    shared: &Arc<Shared>,
    key: &LockKey,
    lease: Lease,
    identity: &Identity,
    wait: Duration,
    retry: RetryPolicy,
) -> crate::Result<Grant> {
    let started = Instant::now();
    let mut attempts = 0u32;
    let result = attempt_until_done(shared, key, lease, identity, wait, retry, &mut attempts).await;
    metrics::acquired(&result, started.elapsed(), attempts);
    result
}

async fn attempt_until_done(
    shared: &Arc<Shared>,
    key: &LockKey,
    lease: Lease,
    identity: &Identity,
    wait: Duration,
    retry: RetryPolicy,
    attempts: &mut u32,
) -> crate::Result<Grant> {
    let deadline = Instant::now().checked_add(wait);
    let handoff = shared.handoff.as_ref();
    let mut pacing = Pacing::new();
    let mut woken = false;
    let mut watch: Option<handoff::Watch> = None;
    loop {
        *attempts = attempts.saturating_add(1);
        let attempts = *attempts;
        // A new acquire of a key we just released: let woken waiters
        // (elsewhere) try first.
        let courtesy = handoff
            .filter(|_| attempts == 1)
            .and_then(|handoff| handoff.courtesy_until(&key.redis));
        if let Some(until) = courtesy {
            tokio::time::sleep_until(until).await;
        }
        let seen = match (&mut watch, handoff) {
            (Some(watch), _) => {
                watch.mark();
                None
            }
            (None, Some(handoff)) if retry.delay(attempts).is_some() => handoff.peek(&key.redis),
            _ => None,
        };
        let attempt = acquire::attempt(shared, key, lease, identity, attempts).await?;
        let (shortfall, causes) = match attempt {
            Outcome::Won(grant) => return Ok(grant),
            Outcome::Lost { shortfall, causes } => (shortfall, causes),
        };
        if std::mem::take(&mut woken) {
            pacing.lost();
        }
        let retry_at = retry
            .delay(attempts)
            .and_then(|delay| Instant::now().checked_add(delay))
            .filter(|at| deadline.is_none_or(|deadline| *at < deadline));
        let Some(retry_at) = retry_at else {
            return Err(Error::NotAcquired {
                key: key.user.to_string(),
                attempts,
                shortfall,
                causes,
            });
        };
        if watch.is_none() {
            watch = handoff.map(|handoff| handoff.watch(&key.redis, seen));
        }
        let Some(watch) = &mut watch else {
            tokio::time::sleep_until(retry_at).await;
            continue;
        };
        tokio::select! {
            () = tokio::time::sleep_until(retry_at) => {}
            () = watch.woken() => {
                // A random pause, shorter the longer we have waited: long
                // waits go first, and a woken crowd does not split the votes.
                woken = true;
                let pause = pacing.pause();
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}
