//! Vote counting and validity arithmetic: pure functions, no I/O.
//!
//! Everything the locker decides about an attempt is computed here from counts and
//! durations, so the rules can be checked exhaustively by property tests.

use std::time::Duration;

/// The constant part of the drift allowance, added to `ttl × drift_factor`. It covers
/// the millisecond granularity of Redis expiry and of `PX`.
pub(crate) const DRIFT_CONSTANT: Duration = Duration::from_millis(2);

/// Where an attempt stands after some of its votes have arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// `quorum` instances granted: no further reply can change the outcome.
    Won,
    /// More than `n − quorum` instances denied: a quorum is no longer reachable.
    Lost,
    /// Neither yet: keep waiting for replies.
    Open,
}

/// The majority quorum for `n` instances.
pub(crate) const fn majority(n: usize) -> usize {
    n / 2 + 1
}

/// A quorum is safe when two disjoint sets of `quorum` instances cannot exist among
/// `n`, i.e. `2 × quorum > n`, and reachable when `quorum ≤ n`.
pub(crate) const fn quorum_in_range(n: usize, quorum: usize) -> bool {
    quorum <= n && quorum.saturating_mul(2) > n
}

/// Decides an attempt over `n` instances from `granted` grants and `denied`
/// others (refusals, errors, time-outs and instances not asked alike).
pub(crate) const fn decide(n: usize, quorum: usize, granted: usize, denied: usize) -> Decision {
    if granted >= quorum {
        Decision::Won
    } else if denied > n.saturating_sub(quorum) {
        Decision::Lost
    } else {
        Decision::Open
    }
}

/// The clock-drift allowance for a lock of `ttl`: `ttl × drift_factor + 2 ms`.
///
/// `drift_factor` must be finite and in `[0, 1)`; the builder enforces it.
pub(crate) fn drift(ttl: Duration, drift_factor: f64) -> Duration {
    ttl.mul_f64(drift_factor).saturating_add(DRIFT_CONSTANT)
}

/// The validity left to a lock of `ttl` whose attempt took `elapsed`:
/// `ttl − elapsed − drift`, or `None` when nothing is left.
pub(crate) fn validity(ttl: Duration, elapsed: Duration, drift: Duration) -> Option<Duration> {
    ttl.checked_sub(elapsed)?
        .checked_sub(drift)
        .filter(|left| !left.is_zero())
}

/// How long, from the start of an attempt, the lock stays exclusive given the
/// clock rates of the instances that granted it (`None` for an unknown rate, taken
/// as exact): an instance whose clock runs at rate `r` drops the key after about
/// `ttl / r` of our time, and another owner can win once no more than `n − quorum`
/// of the granting instances still hold it. So the lock lasts as long as the
/// `(n − quorum + 1)`-th longest of those lifetimes — never longer than `ttl`.
pub(crate) fn granted_lifetime(
    ttl: Duration,
    rates: impl IntoIterator<Item = Option<f64>>,
    n: usize,
    quorum: usize,
) -> Duration {
    let lifetime = |rate: Option<f64>| match rate {
        // Slower clocks keep the key longer, which the cap below ignores.
        Some(rate) if rate > 1.0 => ttl.div_f64(rate),
        _ => ttl,
    };
    // On the stack for the usual sizes: this runs on every attempt.
    let mut buffer = [Duration::ZERO; STACK_MEMBERS];
    let mut count = 0;
    let mut spilled = Vec::new();
    for rate in rates {
        if count < STACK_MEMBERS {
            buffer[count] = lifetime(rate);
            count += 1;
        } else {
            spilled.push(lifetime(rate));
        }
    }
    let lifetimes: &mut [Duration] = if spilled.is_empty() {
        &mut buffer[..count]
    } else {
        spilled.extend_from_slice(&buffer);
        &mut spilled
    };
    lifetimes.sort_unstable_by(|a, b| b.cmp(a));
    let needed = n.saturating_sub(quorum) + 1;
    lifetimes
        .get(needed - 1)
        .copied()
        // Fewer grants than that cannot win; nothing is exclusive then.
        .unwrap_or(Duration::ZERO)
        .min(ttl)
}

/// Members whose lifetimes [`granted_lifetime`] sorts without allocating.
const STACK_MEMBERS: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_granting_set_decides_how_long_the_lock_lasts() {
        let ttl = Duration::from_millis(300);
        // 5 instances, quorum 3: exclusive while 3 of the granting ones hold it.
        let grants = |rates: &[Option<f64>]| granted_lifetime(ttl, rates.iter().copied(), 5, 3);
        assert_eq!(grants(&[None, None, None]), ttl);
        assert_eq!(grants(&[Some(1.0), Some(0.5), Some(0.9)]), ttl);
        // 2 fast + 1 exact: the fast ones drop it at half the TTL.
        assert_eq!(grants(&[Some(2.0), Some(2.0), None]), ttl / 2);
        // 2 fast of 4 granting: two exact ones plus one fast still make 3 holders
        // until the fast ones expire.
        assert_eq!(grants(&[Some(2.0), Some(2.0), None, None]), ttl / 2);
        // 1 fast of 4 granting: three exact ones outlast it.
        assert_eq!(grants(&[Some(2.0), None, None, None]), ttl);
        assert_eq!(
            grants(&[Some(4.0), Some(3.0), Some(2.0), Some(2.0), Some(2.0)]),
            ttl / 2
        );
    }

    #[test]
    fn many_members_spill_off_the_stack_with_the_same_answer() {
        let ttl = Duration::from_millis(1000);
        // 20 members, quorum 11: exclusive while 10 of them hold it.
        let rates = (0..20).map(|i| (i < 11).then_some(2.0));
        assert_eq!(granted_lifetime(ttl, rates, 20, 11), ttl / 2);
        let rates = (0..20).map(|i| (i < 10).then_some(2.0));
        assert_eq!(granted_lifetime(ttl, rates, 20, 11), ttl);
    }

    #[test]
    fn majorities() {
        let expected = [
            (1, 1),
            (2, 2),
            (3, 2),
            (4, 3),
            (5, 3),
            (6, 4),
            (7, 4),
            (9, 5),
        ];
        for (n, q) in expected {
            assert_eq!(majority(n), q, "n = {n}");
        }
    }

    #[test]
    fn unsafe_or_unreachable_quorums_are_out_of_range() {
        assert!(!quorum_in_range(2, 1), "1 of 2 lets old and new both win");
        assert!(!quorum_in_range(4, 2), "2 of 4 lets two disjoint pairs win");
        assert!(!quorum_in_range(5, 6));
        assert!(!quorum_in_range(1, 0));
        assert!(quorum_in_range(2, 2));
        assert!(quorum_in_range(5, 5));
    }

    #[test]
    fn validity_subtracts_elapsed_and_drift() {
        let ttl = Duration::from_millis(1000);
        let d = drift(ttl, 0.01);
        assert_eq!(d, Duration::from_millis(12));
        assert_eq!(
            validity(ttl, Duration::from_millis(100), d),
            Some(Duration::from_millis(888))
        );
        assert_eq!(validity(ttl, Duration::from_millis(988), d), None);
        assert_eq!(validity(ttl, Duration::from_secs(5), d), None);
    }

    proptest! {
        /// Every reachable count for every N ≤ 9 and every in-range quorum: the
        /// decision is consistent with the counts, and once every instance has voted
        /// the attempt is decided (even N never hangs on a split vote).
        #[test]
        fn decision_matches_counts(n in 1usize..=9, q_off in 0usize..9, granted in 0usize..=9, failed in 0usize..=9) {
            let quorum = majority(n) + q_off % (n - majority(n) + 1);
            prop_assume!(granted + failed <= n);
            prop_assert!(quorum_in_range(n, quorum));
            let decision = decide(n, quorum, granted, failed);
            match decision {
                Decision::Won => prop_assert!(granted >= quorum),
                Decision::Lost => {
                    prop_assert!(granted < quorum);
                    // Even if every instance still out granted, a quorum is impossible.
                    prop_assert!(granted + (n - granted - failed) < quorum);
                }
                Decision::Open => {
                    prop_assert!(granted < quorum);
                    prop_assert!(granted + (n - granted - failed) >= quorum);
                }
            }
            if granted + failed == n {
                prop_assert_ne!(decision, Decision::Open);
            }
        }

        /// No two disjoint sets of instances can both reach an in-range quorum.
        #[test]
        fn two_winners_cannot_be_disjoint(n in 1usize..=9, quorum in 1usize..=9) {
            if quorum_in_range(n, quorum) {
                prop_assert!(2 * quorum > n);
            } else {
                prop_assert!(quorum > n || 2 * quorum <= n);
            }
        }

        /// Validity is positive exactly when ttl exceeds elapsed plus drift, and never
        /// more than ttl minus drift.
        #[test]
        fn validity_is_ttl_minus_elapsed_minus_drift(ttl_ms in 1u64..10_000_000, elapsed_us in 0u64..20_000_000_000, factor in 0.0f64..0.5) {
            let ttl = Duration::from_millis(ttl_ms);
            let elapsed = Duration::from_micros(elapsed_us);
            let d = drift(ttl, factor);
            prop_assert!(d >= DRIFT_CONSTANT);
            match validity(ttl, elapsed, d) {
                Some(left) => {
                    prop_assert!(!left.is_zero());
                    prop_assert_eq!(left + elapsed + d, ttl);
                }
                None => prop_assert!(elapsed + d >= ttl),
            }
        }
    }
}
