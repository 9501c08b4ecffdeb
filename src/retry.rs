//! How `acquire` waits between attempts: a small copyable policy that yields the
//! delay before each retry.

use std::time::Duration;

/// The delays `acquire` sleeps between attempts, and how many attempts it makes.
///
/// Every delay is randomised by the jitter fraction `j`: a nominal delay `d`
/// becomes a uniform draw from `[d × (1 − j), d × (1 + j)]`, so clients that lost to
/// the same owner do not retry in lock-step. The overall time limit is the
/// locker's [`default_wait`](crate::Builder::default_wait).
///
/// # Default
///
/// - fixed 100 ms with jitter 0.5 (each delay 50–150 ms);
/// - no attempt limit (the acquire timeout ends the wait).
///
/// The Redlock peers wait 50–250 ms at random. Locks guarding expensive work are
/// usually held for much longer than one attempt (a millisecond), so a waiter's
/// latency is dominated by how soon it retries after the release; 100 ms on average
/// halves the peers' idle time while keeping the load on Redis at ten attempts per
/// second per waiter.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use quorumlock::RetryPolicy;
///
/// let policy = RetryPolicy::exponential(Duration::from_millis(10))
///     .with_max_delay(Duration::from_millis(500))
///     .with_jitter(0.2)
///     .with_max_attempts(20);
/// assert!(policy.delay(1).is_some());
/// assert_eq!(policy.delay(20), None); // the 21st attempt is never made
/// assert_eq!(quorumlock::RetryPolicy::never().delay(1), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    backoff: Backoff,
    max_delay: Duration,
    jitter: f64,
    max_attempts: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Backoff {
    Never,
    Fixed(Duration),
    Linear { initial: Duration, step: Duration },
    Exponential { initial: Duration, factor: u32 },
}

/// The cap on linear and exponential delays unless [`RetryPolicy::with_max_delay`]
/// sets another.
const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(1);

impl RetryPolicy {
    /// One attempt only: `acquire` behaves like `try_acquire`.
    pub const fn never() -> Self {
        Self::with_backoff(Backoff::Never).with_max_attempts(1)
    }

    /// The same nominal delay before every retry.
    pub const fn fixed(delay: Duration) -> Self {
        Self::with_backoff(Backoff::Fixed(delay))
    }

    /// `initial`, then `initial + step`, `initial + 2 × step`, … up to the maximum
    /// delay (1 s unless set).
    pub const fn linear(initial: Duration, step: Duration) -> Self {
        Self::with_backoff(Backoff::Linear { initial, step })
    }

    /// `initial`, then doubling (or [`with_factor`](Self::with_factor)) up to the
    /// maximum delay (1 s unless set).
    pub const fn exponential(initial: Duration) -> Self {
        Self::with_backoff(Backoff::Exponential { initial, factor: 2 })
    }

    const fn with_backoff(backoff: Backoff) -> Self {
        Self {
            backoff,
            max_delay: DEFAULT_MAX_DELAY,
            jitter: 0.0,
            max_attempts: None,
        }
    }

    /// The growth factor of an exponential policy (ignored by the others).
    pub const fn with_factor(mut self, factor: u32) -> Self {
        if let Backoff::Exponential { initial, .. } = self.backoff {
            self.backoff = Backoff::Exponential { initial, factor };
        }
        self
    }

    /// Caps linear and exponential delays (ignored by the others).
    pub const fn with_max_delay(mut self, max: Duration) -> Self {
        self.max_delay = max;
        self
    }

    /// Randomises each delay by ± this fraction of it; clamped to `[0, 1]`.
    pub const fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Gives up after this many attempts in all (at least one is always made).
    pub const fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// The delay before attempt `attempts + 1`, after `attempts` failed ones, or
    /// `None` when the policy gives up.
    pub fn delay(&self, attempts: u32) -> Option<Duration> {
        self.delay_with(attempts, unit_random())
    }

    /// [`delay`](Self::delay) with the random draw `unit ∈ [0, 1)` passed in.
    fn delay_with(&self, attempts: u32, unit: f64) -> Option<Duration> {
        if self.max_attempts.is_some_and(|max| attempts >= max) {
            return None;
        }
        let retry = attempts.saturating_sub(1);
        let nominal = match self.backoff {
            Backoff::Never => return None,
            Backoff::Fixed(delay) => delay,
            Backoff::Linear { initial, step } => initial
                .saturating_add(step.saturating_mul(retry))
                .min(self.max_delay),
            Backoff::Exponential { initial, factor } => initial
                .saturating_mul(factor.saturating_pow(retry))
                .min(self.max_delay),
        };
        let jitter = if self.jitter.is_nan() {
            0.0
        } else {
            self.jitter.clamp(0.0, 1.0)
        };
        let scale = 1.0 - jitter + 2.0 * jitter * unit;
        Some(Duration::try_from_secs_f64(nominal.as_secs_f64() * scale).unwrap_or(nominal))
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::fixed(Duration::from_millis(100)).with_jitter(0.5)
    }
}

/// A uniform draw from `[0, 1)`. Jitter needs no secrecy, but the OS generator is
/// already a dependency (for tokens) and a failure here only removes the jitter.
fn unit_random() -> f64 {
    getrandom::u64().map_or(0.5, |bits| (bits >> 11) as f64 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn default_is_50_to_150_ms() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.delay_with(1, 0.0), Some(MS * 50));
        assert_eq!(policy.delay_with(7, 0.5), Some(MS * 100));
        assert!(policy.delay_with(3, 0.999_999).unwrap() < MS * 150);
        for attempts in 1..100 {
            let delay = policy.delay(attempts).unwrap();
            assert!((MS * 50..=MS * 150).contains(&delay), "{delay:?}");
        }
    }

    #[test]
    fn linear_and_exponential_grow_to_their_cap() {
        let linear = RetryPolicy::linear(MS * 10, MS * 5).with_max_delay(MS * 22);
        let delays: Vec<_> = (1..=5)
            .map(|n| linear.delay_with(n, 0.0).unwrap())
            .collect();
        assert_eq!(delays, [MS * 10, MS * 15, MS * 20, MS * 22, MS * 22]);

        let exponential = RetryPolicy::exponential(MS).with_factor(3);
        let delays: Vec<_> = (1..=8)
            .map(|n| exponential.delay_with(n, 0.0).unwrap())
            .collect();
        assert_eq!(
            delays,
            [
                MS,
                MS * 3,
                MS * 9,
                MS * 27,
                MS * 81,
                MS * 243,
                MS * 729,
                MS * 1000
            ]
        );
        // Far beyond any realistic count nothing overflows.
        assert_eq!(exponential.delay_with(u32::MAX - 1, 0.0), Some(MS * 1000));
    }

    #[test]
    fn attempt_limits() {
        assert_eq!(RetryPolicy::never().delay_with(1, 0.3), None);
        let three = RetryPolicy::fixed(MS).with_max_attempts(3);
        assert!(three.delay_with(2, 0.3).is_some());
        assert_eq!(three.delay_with(3, 0.3), None);
    }

    #[test]
    fn absurd_jitter_is_clamped() {
        let nan = RetryPolicy::fixed(MS * 10).with_jitter(f64::NAN);
        assert_eq!(nan.delay_with(1, 0.9), Some(MS * 10));
        let wild = RetryPolicy::fixed(MS * 10).with_jitter(7.0);
        assert_eq!(wild.delay_with(1, 0.0), Some(Duration::ZERO));
        assert_eq!(wild.delay_with(1, 0.5), Some(MS * 10));
    }
}
