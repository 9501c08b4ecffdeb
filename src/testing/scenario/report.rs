//! What a run saw: its counts, the violations, and percentiles of latency and
//! validity, as text and as a Markdown row. Apart from the run, which only fills
//! them in.

use std::fmt;
use std::time::Duration;

use crate::testing::checker::Violation;

/// Percentiles of some durations.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    /// How many.
    pub count: usize,
    /// The smallest.
    pub min: Duration,
    /// The median.
    pub p50: Duration,
    /// The 99th percentile.
    pub p99: Duration,
    /// The largest.
    pub max: Duration,
}

impl Summary {
    pub(super) fn of(mut values: Vec<Duration>) -> Self {
        values.sort_unstable();
        let at = |q: f64| {
            values
                .get(((values.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or_default()
        };
        Self {
            count: values.len(),
            min: at(0.0),
            p50: at(0.5),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// What a scenario run saw.
#[derive(Debug, Clone)]
pub struct Report {
    /// The scenario's name.
    pub name: String,
    /// Locks acquired.
    pub acquisitions: usize,
    /// `acquire` calls made.
    pub calls: usize,
    /// Calls that ended in `NotAcquired` (contention or too few instances).
    pub not_acquired: usize,
    /// Calls that ended in any other error.
    pub errors: usize,
    /// Overlapping tenures of one key: mutual-exclusion violations.
    pub violations: Vec<Violation>,
    /// Keys of ours still on a running server after the run and its cleanup.
    pub keys_left: usize,
    /// The longest `acquire` or `release` call.
    pub longest_call: Duration,
    /// How long successful `acquire` calls took (waiting for the lock included).
    pub acquire_latency: Summary,
    /// The validity left when `acquire` returned.
    pub validity: Summary,
    /// How long the clients ran.
    pub elapsed: Duration,
}

impl Report {
    /// The header of [`row`](Self::row)'s Markdown table.
    pub fn header() -> &'static str {
        "| scenario | acquisitions | violations | keys left | longest call | acquire p50 / p99 | validity p50 / min |\n|---|---|---|---|---|---|---|"
    }

    /// The report as one Markdown table row.
    pub fn row(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} | {} / {} | {} / {} |",
            self.name,
            self.acquisitions,
            self.violations.len(),
            self.keys_left,
            ms(self.longest_call),
            ms(self.acquire_latency.p50),
            ms(self.acquire_latency.p99),
            ms(self.validity.p50),
            ms(self.validity.min),
        )
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} acquisitions in {} calls ({} not acquired, {} errors), {} violations, {} keys left, longest call {}",
            self.name,
            self.acquisitions,
            self.calls,
            self.not_acquired,
            self.errors,
            self.violations.len(),
            self.keys_left,
            ms(self.longest_call)
        )?;
        for violation in self.violations.iter().take(3) {
            write!(f, "\n  {violation}")?;
        }
        Ok(())
    }
}

fn ms(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1e3)
}
