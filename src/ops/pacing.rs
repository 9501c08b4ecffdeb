//! How a waiting acquire paces the retries it makes when a release wakes it:
//! a random pause, spread wider after each lost woken attempt and shorter the
//! longer the wait has lasted.

use std::time::Duration;

use tokio::time::Instant;

/// A woken waiter retries after a random pause of up to its spread: at first
/// this, doubled after each woken attempt it lost (up to [`MAX_SPREAD`]), so a
/// crowd woken by one release does not split the votes among itself.
const FIRST_SPREAD: Duration = Duration::from_millis(1);
const MAX_SPREAD: Duration = Duration::from_millis(16);
/// The spread shrinks with the time waited, `spread / (1 + waited / this)`: a
/// waiter that has waited long retries almost at once and beats the newer ones.
const PRIORITY_AGE: Duration = Duration::from_millis(50);

/// How a waiter paces the retries it makes on wake-ups.
pub(crate) struct Pacing {
    since: Instant,
    spread: Duration,
}

impl Pacing {
    pub(crate) fn new() -> Self {
        Self {
            since: Instant::now(),
            spread: FIRST_SPREAD,
        }
    }

    /// A woken attempt was lost: spread wider next time.
    pub(crate) fn lost(&mut self) {
        self.spread = (self.spread * 2).min(MAX_SPREAD);
    }

    /// The pause before the retry of a wake-up.
    pub(crate) fn pause(&self) -> Duration {
        let draw = getrandom::u64().map_or(0.5, |bits| (bits >> 11) as f64 / (1u64 << 53) as f64);
        self.pause_with(draw)
    }

    /// As `pause`, given a uniform draw in [0, 1).
    fn pause_with(&self, draw: f64) -> Duration {
        let age = self.since.elapsed().as_secs_f64() / PRIORITY_AGE.as_secs_f64();
        self.spread.div_f64(1.0 + age).mul_f64(draw.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_wake_up_widens_the_spread_up_to_its_cap() {
        let mut pacing = Pacing::new();
        assert!(pacing.pause_with(1.0) <= FIRST_SPREAD);
        for _ in 0..10 {
            pacing.lost();
        }
        assert_eq!(pacing.spread, MAX_SPREAD);
        assert!(pacing.pause_with(0.999) > FIRST_SPREAD);
        assert_eq!(pacing.pause_with(0.0), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_wait_retries_sooner() {
        let pacing = Pacing::new();
        let fresh = pacing.pause_with(0.5);
        tokio::time::advance(PRIORITY_AGE * 9).await;
        let aged = pacing.pause_with(0.5);
        assert!(aged * 9 < fresh * 2, "{aged:?} vs {fresh:?}");
    }
}
