//! TTL arithmetic every layer agrees on: the bounds of a TTL and of an
//! auto-extend interval, checked before any I/O.

use std::time::Duration;

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
pub(crate) fn check_ttl(ttl: Duration, drift_factor: f64) -> crate::Result<()> {
    let invalid = |reason| Err(Error::InvalidTtl { ttl, reason });
    if ttl > MAX_TTL {
        return invalid("longer than quorumlock::MAX_TTL");
    }
    let whole = Duration::from_millis(ttl.as_millis() as u64);
    if whole.is_zero() {
        return invalid("shorter than the 1 ms resolution of PX");
    }
    if whole <= quorum::drift(whole, drift_factor) {
        return invalid("not longer than its clock-drift allowance (ttl × drift factor + 2 ms)");
    }
    Ok(())
}

/// An auto-extend interval must be above zero and at most half the validity an
/// extend leaves, so that a failed extend still has time for another try.
pub(crate) fn check_interval(
    every: Duration,
    ttl: Duration,
    drift_factor: f64,
) -> crate::Result<()> {
    let validity = ttl.saturating_sub(quorum::drift(ttl, drift_factor));
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
