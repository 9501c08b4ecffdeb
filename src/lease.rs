//! The lease: a TTL as the instances count it (whole milliseconds, for `PX`),
//! validated once, with its drift allowance and the deadline arithmetic every
//! operation on a lock shares. Also the bounds of an auto-extend interval.

use std::time::Duration;

use tokio::time::Instant;

use crate::error::Error;
use crate::quorum;

/// The largest TTL accepted: `2³² − 1` seconds, about 136 years. Far below what
/// `PX` (milliseconds in a signed 64-bit count from the epoch) allows, and far from
/// any overflow in instant arithmetic.
pub const MAX_TTL: Duration = Duration::from_secs(u32::MAX as u64);

/// A TTL must be at least one millisecond, at most [`MAX_TTL`], and longer than its
/// drift allowance (or no attempt could ever be valid). `PX` counts whole
/// milliseconds, so a fraction is dropped before these checks, as the attempt
/// drops it.
fn check_ttl(ttl: Duration, drift_factor: f64) -> crate::Result<()> {
    let invalid = |reason| Err(Error::InvalidTtl { ttl, reason });
    // Compared in whole milliseconds, as sent: MAX_TTL and a fraction is
    // MAX_TTL (and the u128 is checked before it is narrowed).
    let whole_ms = ttl.as_millis();
    if whole_ms > MAX_TTL.as_millis() {
        return invalid("longer than quorumlock::MAX_TTL");
    }
    let whole = Duration::from_millis(whole_ms as u64);
    if whole.is_zero() {
        return invalid("shorter than the 1 ms resolution of PX");
    }
    if whole <= quorum::drift(whole, drift_factor) {
        return invalid("not longer than its clock-drift allowance (ttl × drift factor + 2 ms)");
    }
    Ok(())
}

/// A TTL as sent in `PX`, with its drift allowance: built once per operation,
/// from the caller's TTL and the locker's drift factor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lease {
    /// Whole milliseconds: `PX` counts no fraction, so no validity may.
    ttl: Duration,
    /// `ttl × drift factor + 2 ms` (see [`quorum::drift`]).
    drift: Duration,
}

impl Lease {
    /// Validates `ttl` (see [`check_ttl`]) and drops its fraction of a
    /// millisecond.
    pub(crate) fn new(ttl: Duration, drift_factor: f64) -> crate::Result<Self> {
        check_ttl(ttl, drift_factor)?;
        let ttl = Duration::from_millis(ttl.as_millis() as u64);
        Ok(Self {
            ttl,
            drift: quorum::drift(ttl, drift_factor),
        })
    }

    /// The TTL the instances are sent.
    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The TTL in milliseconds, for `PX` and `PEXPIRE`.
    pub(crate) fn px(&self) -> u64 {
        // At most `MAX_TTL`: far inside a u64 of milliseconds.
        self.ttl.as_millis() as u64
    }

    /// The clock-drift allowance.
    pub(crate) fn drift(&self) -> Duration {
        self.drift
    }

    /// The validity left to a lock whose keys last `lifetime` from its
    /// operation's start, `elapsed` after that start: `lifetime − elapsed −
    /// drift`, or `None` when nothing is left.
    pub(crate) fn validity(&self, lifetime: Duration, elapsed: Duration) -> Option<Duration> {
        quorum::validity(lifetime, elapsed, self.drift)
    }

    /// When a lock whose keys last `lifetime` from `start` stops being valid:
    /// `start + lifetime − drift`, never before `start`.
    pub(crate) fn valid_until(&self, start: Instant, lifetime: Duration) -> Instant {
        start + lifetime.saturating_sub(self.drift)
    }

    /// How long background work on keys set with this lease is worth: past the
    /// TTL they have expired by themselves; never less than one instance
    /// timeout.
    pub(crate) fn bound(&self, instance_timeout: Duration) -> Duration {
        self.ttl.max(instance_timeout)
    }

    /// Whether `every` fits as an auto-extend interval (see
    /// [`check_interval`]).
    pub(crate) fn check_interval(&self, every: Duration) -> crate::Result<()> {
        check_interval(every, self.ttl, self.drift)
    }
}

/// The watchdog's interval unless the caller chose one: a third of the TTL,
/// so that two extends can fail before the lock lapses.
pub(crate) fn default_extend_every(ttl: Duration) -> Duration {
    ttl / 3
}

/// An auto-extend interval must be above zero and at most half the validity an
/// extend leaves, so that a failed extend still has time for another try.
fn check_interval(every: Duration, ttl: Duration, drift: Duration) -> crate::Result<()> {
    let validity = ttl.saturating_sub(drift);
    if every.is_zero() || every > validity / 2 {
        return Err(Error::InvalidConfig {
            setting: "auto_extend_every",
            reason: format!(
                "{every:?} must be above zero and at most half the lock's validity after an extend ({validity:?})"
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_counts_whole_milliseconds_and_its_drift() {
        let lease = Lease::new(Duration::from_micros(10_999), 0.01).unwrap();
        assert_eq!(lease.ttl(), Duration::from_millis(10));
        assert_eq!(lease.px(), 10);
        assert_eq!(
            lease.drift(),
            quorum::drift(Duration::from_millis(10), 0.01)
        );
    }

    #[test]
    fn bad_ttls_are_refused() {
        for ttl in [
            Duration::ZERO,
            Duration::from_micros(999),
            Duration::from_millis(2),
        ] {
            assert!(
                matches!(Lease::new(ttl, 0.01), Err(Error::InvalidTtl { .. })),
                "{ttl:?}"
            );
        }
        assert!(Lease::new(MAX_TTL + Duration::from_millis(1), 0.01).is_err());
        assert!(Lease::new(MAX_TTL, 0.01).is_ok());
        let just_over = MAX_TTL + Duration::from_micros(999);
        assert_eq!(Lease::new(just_over, 0.01).unwrap().ttl(), MAX_TTL);
        assert!(Lease::new(Duration::MAX, 0.01).is_err());
    }

    #[test]
    fn validity_and_deadline_agree() {
        let lease = Lease::new(Duration::from_millis(1_000), 0.01).unwrap();
        let start = Instant::now();
        let lifetime = Duration::from_millis(900);
        let elapsed = Duration::from_millis(100);
        let validity = lease.validity(lifetime, elapsed).unwrap();
        assert_eq!(
            start + elapsed + validity,
            lease.valid_until(start, lifetime)
        );
        // A lifetime inside the drift allowance ends at once, never before the start.
        assert_eq!(lease.valid_until(start, Duration::from_millis(5)), start);
        assert_eq!(
            lease.validity(Duration::from_millis(5), Duration::ZERO),
            None
        );
    }

    #[test]
    fn an_interval_must_fit_in_half_the_validity() {
        let lease = Lease::new(Duration::from_millis(1_000), 0.01).unwrap();
        assert!(lease.check_interval(Duration::from_millis(400)).is_ok());
        assert!(lease.check_interval(Duration::from_millis(600)).is_err());
        assert!(lease.check_interval(Duration::ZERO).is_err());
        assert_eq!(
            default_extend_every(Duration::from_millis(900)),
            Duration::from_millis(300)
        );
    }
}
