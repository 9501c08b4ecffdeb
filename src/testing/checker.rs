//! A mutual-exclusion checker: holders record when they believed they held a lock,
//! on one shared monotonic clock, and the checker reports every overlap of two
//! tenures of the same key.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// One holder's belief that it held `key` from `start` to `end`.
#[derive(Debug, Clone)]
pub struct Tenure {
    /// The lock key.
    pub key: String,
    /// Who held it (any label: a task or client number).
    pub holder: usize,
    /// When the acquire returned.
    pub start: Instant,
    /// When the holder stopped believing it held the lock: its release, or the
    /// end of its validity if that came first.
    pub end: Instant,
    /// The lock's fencing token, for fenced locks.
    pub token: Option<u64>,
}

/// Two tenures of one key that overlapped: a mutual-exclusion violation.
#[derive(Debug, Clone)]
pub struct Violation {
    /// The earlier tenure.
    pub first: Tenure,
    /// The one that began before `first` ended.
    pub second: Tenure,
}

impl Violation {
    /// How long both believed they held the lock.
    pub fn overlap(&self) -> Duration {
        self.first
            .end
            .min(self.second.end)
            .saturating_duration_since(self.second.start)
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "key {:?}: holder {} and holder {} overlapped for {:?}",
            self.first.key,
            self.first.holder,
            self.second.holder,
            self.overlap()
        )
    }
}

/// Collects tenures from many tasks; cheap to clone (clones share the record).
///
/// ```
/// use std::time::Duration;
/// use quorumlock::testing::Checker;
/// use tokio::time::Instant;
///
/// let checker = Checker::new();
/// let t0 = Instant::now();
/// let ms = Duration::from_millis;
/// checker.record("job", 1, t0, t0 + ms(10));
/// checker.record("job", 2, t0 + ms(10), t0 + ms(20)); // back to back: fine
/// checker.record("job", 3, t0 + ms(15), t0 + ms(30)); // overlaps holder 2
/// let violations = checker.violations();
/// assert_eq!(violations.len(), 1);
/// assert_eq!(violations[0].overlap(), ms(5));
/// ```
#[derive(Debug, Clone, Default)]
pub struct Checker {
    tenures: Arc<Mutex<Vec<Tenure>>>,
}

impl Checker {
    /// An empty record.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `holder` believed it held `key` from `start` to `end`.
    pub fn record(&self, key: &str, holder: usize, start: Instant, end: Instant) {
        self.record_fenced(key, holder, start, end, None);
    }

    /// As [`record`](Self::record), with the lock's fencing token.
    pub fn record_fenced(
        &self,
        key: &str,
        holder: usize,
        start: Instant,
        end: Instant,
        token: Option<u64>,
    ) {
        self.tenures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Tenure {
                key: key.to_string(),
                holder,
                start,
                end: end.max(start),
                token,
            });
    }

    /// Fenced tenures of one key, in the order they began, whose token is not
    /// greater than an earlier one's: each pair is (earlier, later). Empty when
    /// every holder's token exceeded every earlier holder's.
    pub fn stale_tokens(&self) -> Vec<(Tenure, Tenure)> {
        let mut by_key: HashMap<String, Vec<Tenure>> = HashMap::new();
        for tenure in self.tenures() {
            if tenure.token.is_some() {
                by_key.entry(tenure.key.clone()).or_default().push(tenure);
            }
        }
        let mut stale = Vec::new();
        for tenures in by_key.values_mut() {
            tenures.sort_by_key(|tenure| tenure.start);
            let mut highest: Option<&Tenure> = None;
            for tenure in tenures.iter() {
                if let Some(earlier) = highest {
                    if tenure.token <= earlier.token {
                        stale.push((earlier.clone(), tenure.clone()));
                        continue;
                    }
                }
                highest = Some(tenure);
            }
        }
        stale
    }

    /// How many tenures were recorded.
    pub fn len(&self) -> usize {
        self.tenures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every recorded tenure.
    pub fn tenures(&self) -> Vec<Tenure> {
        self.tenures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Every pair of tenures of the same key that overlap (sharing only an
    /// endpoint is not an overlap). Each tenure is compared with the tenures that
    /// began before it and had not yet ended.
    pub fn violations(&self) -> Vec<Violation> {
        let mut by_key: HashMap<String, Vec<Tenure>> = HashMap::new();
        for tenure in self.tenures() {
            by_key.entry(tenure.key.clone()).or_default().push(tenure);
        }
        let mut violations = Vec::new();
        for tenures in by_key.values_mut() {
            tenures.sort_by_key(|tenure| tenure.start);
            // Tenures still open at the current start, ordered as they began.
            let mut open: Vec<&Tenure> = Vec::new();
            for tenure in tenures.iter() {
                open.retain(|earlier| earlier.end > tenure.start);
                for earlier in &open {
                    violations.push(Violation {
                        first: (*earlier).clone(),
                        second: tenure.clone(),
                    });
                }
                open.push(tenure);
            }
        }
        violations
    }
}

/// A moment when more tenures of one key were open at once than its capacity
/// allows: a counting-semaphore violation.
#[derive(Debug, Clone)]
pub struct Excess {
    /// When the count rose past the capacity.
    pub at: Instant,
    /// How many were open then.
    pub holders: usize,
    /// The tenures open then.
    pub tenures: Vec<Tenure>,
}

impl Checker {
    /// For a counting semaphore recorded under one key (the semaphore's name,
    /// not its slots'): every moment more than `capacity` tenures of `key`
    /// were open at once (sharing only an endpoint is not being open
    /// together). Empty when the semaphore's invariant held.
    ///
    /// ```
    /// use std::time::Duration;
    /// use quorumlock::testing::Checker;
    /// use tokio::time::Instant;
    ///
    /// let checker = Checker::new();
    /// let (t0, ms) = (Instant::now(), Duration::from_millis);
    /// checker.record("uploads", 1, t0, t0 + ms(30));
    /// checker.record("uploads", 2, t0 + ms(10), t0 + ms(40));
    /// checker.record("uploads", 3, t0 + ms(20), t0 + ms(25)); // three at once
    /// assert!(checker.over_capacity("uploads", 3).is_empty());
    /// assert_eq!(checker.over_capacity("uploads", 2).len(), 1);
    /// assert_eq!(checker.most_at_once("uploads"), 3);
    /// ```
    pub fn over_capacity(&self, key: &str, capacity: usize) -> Vec<Excess> {
        let mut tenures: Vec<Tenure> = self
            .tenures()
            .into_iter()
            .filter(|tenure| tenure.key == key)
            .collect();
        tenures.sort_by_key(|tenure| tenure.start);
        let mut open: Vec<Tenure> = Vec::new();
        let mut excesses = Vec::new();
        for tenure in tenures {
            open.retain(|earlier| earlier.end > tenure.start);
            open.push(tenure.clone());
            if open.len() > capacity {
                excesses.push(Excess {
                    at: tenure.start,
                    holders: open.len(),
                    tenures: open.clone(),
                });
            }
        }
        excesses
    }

    /// The most tenures of `key` open at once: how close a semaphore came to
    /// its capacity (a run that never filled it proves little).
    pub fn most_at_once(&self, key: &str) -> usize {
        let mut tenures: Vec<Tenure> = self
            .tenures()
            .into_iter()
            .filter(|tenure| tenure.key == key)
            .collect();
        tenures.sort_by_key(|tenure| tenure.start);
        let mut open: Vec<Instant> = Vec::new();
        let mut most = 0;
        for tenure in tenures {
            open.retain(|end| *end > tenure.start);
            open.push(tenure.end);
            most = most.max(open.len());
        }
        most
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_overlap_and_only_overlaps() {
        let checker = Checker::new();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        checker.record("a", 1, t0, t0 + ms(100));
        checker.record("a", 2, t0 + ms(50), t0 + ms(60)); // inside 1
        checker.record("a", 3, t0 + ms(55), t0 + ms(150)); // overlaps 1 and 2
        checker.record("b", 4, t0 + ms(50), t0 + ms(60)); // another key
        checker.record("a", 5, t0 + ms(150), t0 + ms(160)); // touches 3's end
        let mut pairs: Vec<(usize, usize)> = checker
            .violations()
            .iter()
            .map(|v| (v.first.holder, v.second.holder))
            .collect();
        pairs.sort_unstable();
        assert_eq!(pairs, [(1, 2), (1, 3), (2, 3)]);
        assert_eq!(checker.len(), 5);
    }

    #[test]
    fn finds_tokens_that_did_not_increase() {
        let checker = Checker::new();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        checker.record_fenced("a", 1, t0, t0 + ms(10), Some(1));
        checker.record_fenced("a", 2, t0 + ms(10), t0 + ms(20), Some(3));
        checker.record_fenced("a", 3, t0 + ms(20), t0 + ms(30), Some(2)); // stale
        checker.record_fenced("a", 4, t0 + ms(30), t0 + ms(40), Some(4));
        checker.record_fenced("b", 5, t0, t0 + ms(10), Some(1)); // another key
        let stale: Vec<(usize, usize)> = checker
            .stale_tokens()
            .iter()
            .map(|(earlier, later)| (earlier.holder, later.holder))
            .collect();
        assert_eq!(stale, [(2, 3)]);
    }
}
