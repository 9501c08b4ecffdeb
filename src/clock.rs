//! Bounds how fast an instance's clock runs against ours, from `TIME` samples
//! taken against this process's monotonic clock. A server whose clock runs fast
//! expires keys early; an upper bound on its rate lets the lock's validity end
//! before its keys do.
//!
//! The bound is not a statistical estimate. Each reply's `TIME` was read at some
//! moment between the request leaving and the reply arriving, so between two
//! samples the server's clock advanced by `Δserver` while ours advanced by at
//! least `sent₂ − received₁`: the rate over that span is at most their ratio,
//! and at least `Δserver / (received₂ − sent₁)`. See [`RateEstimator::bound`]
//! for how the spans combine: a round trip distorted by a stalled server only
//! loosens the bound, a clock that speeds up shows within one probe interval,
//! and a clock stepped back (NTP correcting a fast clock) is measured afresh
//! rather than trusted more.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Samples kept: intervals enough to outvote one distorted interval, few enough
/// to forget a clock that was fast a while ago.
const SAMPLES: usize = 8;
/// Intervals needed before any bound is given: one interval alone could hide a
/// clock stepped back inside it.
const MIN_INTERVALS: usize = 2;
/// A sample whose round trip is over this many times the best one, and over
/// [`RTT_FLOOR`], is skipped: it would only loosen its intervals' bounds.
const RTT_SLACK: u32 = 4;
const RTT_FLOOR: Duration = Duration::from_millis(1);
/// The shortest interval between two samples kept: over a shorter one, a round
/// trip of a few hundred microseconds is a loose bound. Also the pace of the
/// monitor's probes while an instance has no bound yet.
pub(crate) const MIN_INTERVAL: Duration = Duration::from_millis(40);
/// How far (relatively) one interval's rate may lie outside the others' before
/// the clock counts as stepped: 0.2%, well inside the 1% drift allowance that
/// covers what the locker trusts a clock more than it should, and far above
/// the 500 ppm at most that NTP slews by.
const CONSISTENCY: f64 = 0.002;
/// `TIME` counts microseconds: each reading may be up to one short.
const TIME_RESOLUTION: Duration = Duration::from_micros(1);

/// One reading: our monotonic clock when the request left and when the reply
/// came, and the server's clock read somewhere in between.
#[derive(Debug, Clone, Copy)]
struct Sample {
    sent: Instant,
    received: Instant,
    server: Duration,
}

impl Sample {
    fn rtt(&self) -> Duration {
        self.received.saturating_duration_since(self.sent)
    }
}

/// What is known of one instance's clock rate relative to ours.
#[derive(Debug, Default)]
pub(crate) struct RateEstimator {
    samples: VecDeque<Sample>,
}

impl RateEstimator {
    /// Records a `TIME` reply `server` to a request sent at `sent` and answered at
    /// `received`.
    pub(crate) fn record(&mut self, sent: Instant, received: Instant, server: Duration) {
        let sample = Sample {
            sent,
            received,
            server,
        };
        if let Some(last) = self.samples.back() {
            // A clock that went backwards (a restart, an NTP step) says nothing
            // about its rate across the step: measure it again from here, and
            // until then give no bound (its votes do not count).
            if server < last.server {
                self.samples.clear();
            } else if sent < last.received + MIN_INTERVAL {
                // Too close to the last one to bound anything well.
                return;
            } else if !self.consistent(last, &sample) {
                // The new interval's rate cannot be the one the earlier
                // intervals show: the clock was stepped (a step back smaller
                // than the interval's advance only slows it), or its rate
                // changed. Averaged over the step it would look slower than it
                // runs between steps, which is what expires keys.
                self.samples.clear();
            }
        }
        if self.samples.len() == SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    /// Whether the interval from `last` to `next` can share one rate with the
    /// intervals kept: its range of possible rates meets theirs, within
    /// [`CONSISTENCY`] (slewing NTP changes a rate by far less).
    fn consistent(&self, last: &Sample, next: &Sample) -> bool {
        let (Some(low), Some(high)) = (at_least(last, next), at_most(last, next)) else {
            return true;
        };
        let mut kept_low: f64 = 0.0;
        let mut kept_high = f64::INFINITY;
        for (earlier, later) in self.samples.iter().zip(self.samples.iter().skip(1)) {
            if let (Some(low), Some(high)) = (at_least(earlier, later), at_most(earlier, later)) {
                kept_low = kept_low.max(low);
                kept_high = kept_high.min(high);
            }
        }
        low <= kept_high * (1.0 + CONSISTENCY) && high >= kept_low * (1.0 - CONSISTENCY)
    }

    /// Forgets every sample: the instance restarted.
    pub(crate) fn reset(&mut self) {
        self.samples.clear();
    }

    /// The samples whose round trip was close to the best one's.
    fn good(&self) -> impl Iterator<Item = &Sample> {
        let best = self.samples.iter().map(Sample::rtt).min();
        let limit = best.map_or(Duration::ZERO, |best| (best * RTT_SLACK).max(RTT_FLOOR));
        self.samples
            .iter()
            .filter(move |sample| sample.rtt() <= limit)
    }

    /// An upper bound on server seconds per local second; `None` until
    /// [`MIN_INTERVALS`] intervals have been measured.
    ///
    /// Two bounds, the larger wins. Over the widest span (from any sample to
    /// the last) a clock that runs at one rate is bounded tightly: the round
    /// trips' uncertainty is spread over seconds. But a clock stepped back
    /// inside that span would look slower than it runs, and one that sped up
    /// would too; so the bound is never below what any single recent interval
    /// shows the rate was at least.
    pub(crate) fn bound(&self) -> Option<f64> {
        let good: Vec<&Sample> = self.good().collect();
        if good.len() < MIN_INTERVALS + 1 {
            return None;
        }
        let last = good[good.len() - 1];
        let tight = good[..good.len() - 1]
            .iter()
            .filter_map(|earlier| at_most(earlier, last))
            .fold(f64::INFINITY, f64::min);
        let recent = good
            .windows(2)
            .filter_map(|pair| at_least(pair[0], pair[1]))
            .fold(0.0, f64::max);
        let bound = tight.max(recent);
        bound.is_finite().then_some(bound)
    }

    /// The rate over the whole window, from the middles of the round trips: for
    /// reports and the fast-clock quarantine, not for validity.
    pub(crate) fn rate(&self) -> Option<f64> {
        let mut good = self.good();
        let first = good.next()?;
        let last = good.last()?;
        let middle = |sample: &Sample| sample.sent + sample.rtt() / 2;
        let ours = middle(last).checked_duration_since(middle(first))?;
        if ours < MIN_INTERVAL {
            return None;
        }
        let rate = last.server.saturating_sub(first.server).as_secs_f64() / ours.as_secs_f64();
        (rate.is_finite() && rate > 0.0).then_some(rate)
    }
}

/// The most the server's clock can have advanced per second of ours between
/// two samples: the second read came at the latest when its reply arrived, the
/// first at the earliest when its request left... and the other way round for
/// our clock.
fn at_most(earlier: &Sample, later: &Sample) -> Option<f64> {
    let ours = later.sent.checked_duration_since(earlier.received)?;
    if ours.is_zero() {
        return None;
    }
    let theirs = later.server.saturating_sub(earlier.server) + TIME_RESOLUTION;
    Some(theirs.as_secs_f64() / ours.as_secs_f64())
}

/// The least it can have advanced per second of ours between two samples.
fn at_least(earlier: &Sample, later: &Sample) -> Option<f64> {
    let ours = later.received.checked_duration_since(earlier.sent)?;
    if ours.is_zero() {
        return None;
    }
    let theirs = later
        .server
        .saturating_sub(earlier.server + TIME_RESOLUTION);
    Some(theirs.as_secs_f64() / ours.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPOCH: Duration = Duration::from_secs(1_700_000_000);

    /// `count` samples `every` apart from a server whose clock runs at `rate`,
    /// each read `read_at` into a round trip of `rtt`.
    fn feed(
        estimator: &mut RateEstimator,
        start: Instant,
        rate: f64,
        every: Duration,
        count: u32,
        rtt: Duration,
    ) {
        for i in 0..count {
            let sent = start + every * i;
            let read = (sent + rtt / 2).duration_since(start);
            estimator.record(sent, sent + rtt, EPOCH + read.mul_f64(rate));
        }
    }

    #[test]
    fn bounds_fast_slow_and_true_clocks_from_above() {
        let rtt = Duration::from_micros(300);
        for rate in [0.5, 0.99, 1.0, 1.01, 1.02, 2.0] {
            let mut estimator = RateEstimator::default();
            feed(
                &mut estimator,
                Instant::now(),
                rate,
                Duration::from_millis(100),
                8,
                rtt,
            );
            let bound = estimator.bound().unwrap();
            // At least the true rate, and loose by about rtt / interval.
            assert!(bound >= rate, "{rate}: {bound}");
            assert!(bound < rate * 1.004, "{rate}: {bound}");
            let point = estimator.rate().unwrap();
            assert!((point - rate).abs() < 1e-6, "{rate}: {point}");
        }
    }

    /// Two samples 50 ms apart estimated a 1.02 clock at 1.00 before; the bound
    /// holds whatever the read's place in the round trip.
    #[test]
    fn short_spans_and_long_round_trips_loosen_the_bound_but_never_undercut() {
        let start = Instant::now();
        let rtt = Duration::from_millis(2);
        for read_at in [0.0, 0.5, 1.0] {
            let mut estimator = RateEstimator::default();
            for i in 0..3u32 {
                let sent = start + Duration::from_millis(50) * i;
                let read = (sent + rtt.mul_f64(read_at)).duration_since(start);
                estimator.record(sent, sent + rtt, EPOCH + read.mul_f64(1.02));
            }
            let bound = estimator.bound().unwrap();
            assert!(bound >= 1.02, "read at {read_at}: {bound}");
        }
    }

    #[test]
    fn needs_two_intervals_before_it_answers() {
        let mut estimator = RateEstimator::default();
        assert_eq!(estimator.bound(), None);
        let start = Instant::now();
        feed(
            &mut estimator,
            start,
            2.0,
            Duration::from_millis(10),
            5,
            Duration::ZERO,
        );
        assert_eq!(
            estimator.bound(),
            None,
            "samples closer than MIN_INTERVAL are skipped"
        );
        let mut estimator = RateEstimator::default();
        feed(
            &mut estimator,
            start,
            2.0,
            Duration::from_millis(50),
            2,
            Duration::ZERO,
        );
        assert_eq!(estimator.bound(), None);
        let third = start + Duration::from_millis(100);
        estimator.record(third, third, EPOCH + Duration::from_millis(200));
        assert!(estimator.bound().unwrap() >= 2.0);
    }

    #[test]
    fn a_sample_delayed_by_a_stalled_server_is_skipped() {
        let mut estimator = RateEstimator::default();
        let start = Instant::now();
        feed(
            &mut estimator,
            start,
            1.0,
            Duration::from_millis(100),
            6,
            Duration::from_micros(300),
        );
        // Answered after a 2 s stall: the server read its clock at the end.
        let sent = start + Duration::from_millis(600);
        estimator.record(
            sent,
            sent + Duration::from_secs(2),
            EPOCH + Duration::from_millis(2600),
        );
        let bound = estimator.bound().unwrap();
        assert!((1.0..1.01).contains(&bound), "{bound}");
    }

    #[test]
    fn a_clock_stepped_back_is_measured_again_and_never_trusted_more() {
        let start = Instant::now();
        let every = Duration::from_millis(100);
        let mut estimator = RateEstimator::default();
        feed(&mut estimator, start, 2.0, every, 8, Duration::ZERO);
        let before = estimator.bound().unwrap();
        // Stepped back 3 s: below the last reading.
        let now = start + every * 8;
        let last = EPOCH + (every * 7).mul_f64(2.0);
        estimator.record(now, now, last - Duration::from_secs(3));
        assert_eq!(estimator.bound(), None, "no bound until measured again");
        // Stepped back less than one interval's advance: the interval across the
        // step looks slow, which no single rate explains with the others: it
        // is measured afresh too, rather than trusted at the slower average.
        let mut estimator = RateEstimator::default();
        feed(&mut estimator, start, 2.0, every, 7, Duration::ZERO);
        let stepped = EPOCH + (every * 7).mul_f64(2.0) - Duration::from_millis(150);
        estimator.record(start + every * 7, start + every * 7, stepped);
        assert_eq!(estimator.bound(), None);
        // Then two clean intervals at the true rate.
        for i in 1..=2u32 {
            let at = start + every * (7 + i);
            estimator.record(at, at, stepped + (every * i).mul_f64(2.0));
        }
        assert!(estimator.bound().unwrap() >= before * 0.999_99);
    }

    /// NTP stepping a fast clock back again and again (the soak's scenario:
    /// rate 2, back 300 ms every 700 ms): a 1 s interval holds one or two steps,
    /// so its average rate is below the rate between steps, which is what
    /// expires keys. Probed as the monitor does (every 40 ms while there is no
    /// bound, every second after), no bound given may be below 2.
    #[test]
    fn a_clock_stepped_back_again_and_again_is_never_trusted_at_its_average() {
        let start = Instant::now();
        let server = |t: Duration| {
            let steps = (t.as_millis() / 700) as u32;
            EPOCH + t.mul_f64(2.0) - Duration::from_millis(300) * steps
        };
        let mut estimator = RateEstimator::default();
        let mut bounds = Vec::new();
        let mut t = Duration::ZERO;
        while t < Duration::from_secs(60) {
            let at = start + t;
            estimator.record(at, at, server(t));
            match estimator.bound() {
                Some(bound) => {
                    bounds.push(bound);
                    t += Duration::from_secs(1);
                }
                None => t += MIN_INTERVAL,
            }
        }
        assert!(bounds.len() > 10, "{bounds:?}");
        assert!(bounds.iter().all(|bound| *bound >= 1.999), "{bounds:?}");
    }

    #[test]
    fn a_clock_that_speeds_up_is_measured_afresh() {
        let start = Instant::now();
        let every = Duration::from_millis(100);
        let mut estimator = RateEstimator::default();
        feed(&mut estimator, start, 1.0, every, 6, Duration::ZERO);
        // From here on it runs at 2.0.
        let base = EPOCH + every * 5;
        let sent = start + every * 6;
        estimator.record(sent, sent, base + every.mul_f64(2.0));
        // No single rate explains it with the earlier intervals: measured afresh.
        assert_eq!(estimator.bound(), None);
        for i in 1..=2u32 {
            let at = sent + every * i;
            estimator.record(at, at, base + (every * (i + 1)).mul_f64(2.0));
        }
        // Less TIME's resolution over the interval.
        assert!(
            estimator.bound().unwrap() >= 1.9999,
            "{:?}",
            estimator.bound()
        );
    }
}
