//! The random part of a delay: a uniform draw, and the seed each proxy draws
//! from. Apart as the proxy's one source of chance.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Uniform in `[0, max]`: jitter needs spread, not secrecy.
pub(super) fn up_to(rng: &mut fastrand::Rng, max: Duration) -> Duration {
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.u64(0..=nanos))
}

pub(super) fn seed() -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0x2545_F491_4F6C_DD1D, |since| since.as_nanos() as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_range_and_varies() {
        let mut rng = fastrand::Rng::with_seed(0);
        let max = Duration::from_millis(5);
        let draws: Vec<_> = (0..1000).map(|_| up_to(&mut rng, max)).collect();
        assert!(draws.iter().all(|&d| d <= max));
        assert!(draws.iter().any(|&d| d < max / 4));
        assert!(draws.iter().any(|&d| d > max * 3 / 4));
        assert_eq!(up_to(&mut rng, Duration::ZERO), Duration::ZERO);
    }
}
