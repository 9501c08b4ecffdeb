//! How long a lock lasts from its attempt's start, given the bounds on the
//! clock rates of the instances that granted it: for acquire and extend alike.

use std::time::Duration;

use crate::error::Vote;
use crate::fanout::Fanout;
use crate::quorum;
use crate::shared::Shared;

/// How long the lock lasts from the attempt's start, given the bounds on the
/// clock rates of the instances that granted it; see
/// [`quorum::granted_lifetime`].
pub(crate) fn granted_lifetime(shared: &Shared, fanout: &Fanout, ttl: Duration) -> Duration {
    lifetime_among(shared, ttl, |index| {
        matches!(fanout.vote(index), Some(Vote::Granted))
    })
}

/// As [`granted_lifetime`] if every instance still out granted too.
pub(crate) fn potential_lifetime(shared: &Shared, fanout: &Fanout, ttl: Duration) -> Duration {
    lifetime_among(shared, ttl, |index| {
        fanout.is_pending(index) || matches!(fanout.vote(index), Some(Vote::Granted))
    })
}

fn lifetime_among(shared: &Shared, ttl: Duration, counts: impl Fn(usize) -> bool) -> Duration {
    if !shared.settings.policy.rate_aware_validity {
        return ttl;
    }
    let rates = shared
        .members
        .iter()
        .filter(|member| counts(member.index))
        // An instance measured again since it was asked (a restart, a clock
        // stepped back) could drop the key at any time.
        .map(|member| Some(member.state.clock_rate_bound().unwrap_or(f64::INFINITY)));
    quorum::granted_lifetime(ttl, rates, shared.members.len(), shared.quorum)
}
