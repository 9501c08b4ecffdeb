//! Estimates how fast an instance's clock runs against ours, from `TIME` samples
//! taken against this process's monotonic clock. A server whose clock runs fast
//! expires keys early; knowing its rate lets the lock's validity end before its
//! keys do.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Samples kept: enough for a stable slope, few enough to follow a rate change
/// within a few sample intervals.
const SAMPLES: usize = 8;
/// A sample whose round trip is this many times the best one is distorted by
/// queueing or a stalled server, and is dropped.
const RTT_SLACK: u32 = 4;
/// Spans shorter than this say too little: a 0.5 ms round trip over 50 ms is a
/// 1% error.
const MIN_SPAN: Duration = Duration::from_millis(50);

/// One reading: our monotonic time at the middle of the round trip, and the
/// server's clock.
#[derive(Debug, Clone, Copy)]
struct Sample {
    local: Instant,
    server: Duration,
    rtt: Duration,
}

/// The rate of one instance's clock relative to ours.
#[derive(Debug, Default)]
pub(crate) struct RateEstimator {
    samples: VecDeque<Sample>,
}

impl RateEstimator {
    /// Records a `TIME` reply `server` to a request sent at `sent` and answered at
    /// `received`.
    pub(crate) fn record(&mut self, sent: Instant, received: Instant, server: Duration) {
        let rtt = received.saturating_duration_since(sent);
        let sample = Sample {
            local: sent + rtt / 2,
            server,
            rtt,
        };
        // A server clock that went backwards (restart, manual change) starts over.
        if self.samples.back().is_some_and(|last| server < last.server) {
            self.samples.clear();
        }
        if self.samples.len() == SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    /// Forgets every sample: the instance restarted.
    pub(crate) fn reset(&mut self) {
        self.samples.clear();
    }

    /// Server seconds per local second, by least squares over the samples whose
    /// round trip was close to the best; `None` until they span [`MIN_SPAN`].
    pub(crate) fn rate(&self) -> Option<f64> {
        let best = self.samples.iter().map(|sample| sample.rtt).min()?;
        let limit = (best * RTT_SLACK).max(Duration::from_millis(1));
        let good: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|sample| sample.rtt <= limit)
            .collect();
        let first = good.first()?;
        let last = good.last()?;
        if last.local.duration_since(first.local) < MIN_SPAN {
            return None;
        }
        let base_local = first.local;
        let base_server = first.server;
        let points: Vec<(f64, f64)> = good
            .iter()
            .map(|sample| {
                let x = sample.local.duration_since(base_local).as_secs_f64();
                let y = sample.server.as_secs_f64() - base_server.as_secs_f64();
                (x, y)
            })
            .collect();
        let n = points.len() as f64;
        let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
        let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
        let covariance: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
        let variance: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
        let rate = covariance / variance;
        (rate.is_finite() && rate > 0.0).then_some(rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(estimator: &mut RateEstimator, rate: f64, every: Duration, count: u32) {
        let start = Instant::now();
        let server_start = Duration::from_secs(1_700_000_000);
        for i in 0..count {
            let sent = start + every * i;
            let received = sent + Duration::from_micros(300);
            let elapsed = (sent + Duration::from_micros(150)).duration_since(start);
            estimator.record(sent, received, server_start + elapsed.mul_f64(rate));
        }
    }

    #[test]
    fn finds_fast_slow_and_true_clocks() {
        for rate in [0.5, 0.99, 1.0, 1.01, 2.0] {
            let mut estimator = RateEstimator::default();
            feed(&mut estimator, rate, Duration::from_millis(100), 8);
            let estimate = estimator.rate().unwrap();
            assert!((estimate - rate).abs() < 1e-6, "{rate}: {estimate}");
        }
    }

    #[test]
    fn needs_a_span_before_it_answers() {
        let mut estimator = RateEstimator::default();
        assert_eq!(estimator.rate(), None);
        feed(&mut estimator, 2.0, Duration::from_millis(10), 3);
        assert_eq!(estimator.rate(), None);
    }

    #[test]
    fn ignores_a_sample_delayed_by_a_stalled_server() {
        let mut estimator = RateEstimator::default();
        feed(&mut estimator, 1.0, Duration::from_millis(100), 6);
        // Answered after a 2 s stall: the server read its clock at the end.
        let sent = Instant::now() + Duration::from_millis(600);
        let server = Duration::from_secs(1_700_000_000) + Duration::from_millis(2600);
        estimator.record(sent, sent + Duration::from_secs(2), server);
        let estimate = estimator.rate().unwrap();
        assert!((estimate - 1.0).abs() < 1e-3, "{estimate}");
    }

    #[test]
    fn starts_over_when_the_server_clock_goes_back() {
        let mut estimator = RateEstimator::default();
        feed(&mut estimator, 1.0, Duration::from_millis(100), 8);
        let now = Instant::now() + Duration::from_secs(1);
        estimator.record(now, now, Duration::from_secs(5));
        assert_eq!(estimator.rate(), None);
    }
}
