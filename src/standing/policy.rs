//! How strictly the locker treats instances: the builder's safety settings as
//! the instances' standing reads them.

use std::time::Duration;

/// How strictly the locker treats instances; from the builder.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    /// How long an instance that lost its keys may not vote at least; zero turns
    /// the checks off. The longest TTL set on the servers is used where it is
    /// longer (`Shared::restart_quarantine`).
    pub(crate) restart_quarantine: Duration,
    /// Refuse votes from an instance whose clock runs faster than this rate.
    pub(crate) max_clock_rate: Option<f64>,
    /// Shorten validity to what the granting instances' clock rates allow.
    pub(crate) rate_aware_validity: bool,
    /// How often each instance is probed.
    pub(crate) probe_every: Duration,
}

impl Policy {
    /// Whether grants are checked against the data set's epoch.
    pub(crate) fn checks_epoch(&self) -> bool {
        !self.restart_quarantine.is_zero()
    }

    /// Whether an instance needs a measured clock before it votes.
    pub(crate) fn needs_clock(&self) -> bool {
        self.rate_aware_validity || self.max_clock_rate.is_some()
    }
}
