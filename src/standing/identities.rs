//! Two members that are one server: the second must not vote.

use std::sync::Arc;

use tracing::warn;

use super::member::Member;

/// Compares every member's identity with the others': the later of two members
/// with one `run_id` or one data set is a second name for the same server (or a
/// replica of it) and must not vote.
pub(crate) fn check_identities(members: &[Member]) {
    let identities: Vec<_> = members
        .iter()
        .map(|member| member.state.identity())
        .collect();
    for (index, identity) in identities.iter().enumerate() {
        let same = |other: &(Option<Arc<str>>, Option<Arc<str>>)| {
            (identity.0.is_some() && identity.0 == other.0)
                || (identity.1.is_some() && identity.1 == other.1)
        };
        let duplicate_of = identities[..index].iter().position(same);
        if let Some(first) = duplicate_of {
            warn!(address = %members[index].address, first = %members[first].address, "two instances are one server: the second does not vote");
        }
        members[index].state.checked(identity, duplicate_of);
    }
}
