//! The server's clock: it follows Tokio's, so that paused tests advance it,
//! at a rate that can change, so that a test can make a server's TTLs run fast
//! or slow.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::MemoryInstance;
use crate::error::Error;

/// The server's clock: `at` when Tokio's clock read `anchor`, running `rate` times
/// as fast since.
#[derive(Debug, Clone, Copy)]
pub(super) struct Clock {
    anchor: Instant,
    at: Duration,
    rate: f64,
}

impl Clock {
    /// At the system time, following Tokio's clock at rate 1.
    pub(super) fn system() -> Self {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Self {
            anchor: Instant::now(),
            at: started,
            rate: 1.0,
        }
    }

    pub(super) fn now(&self) -> Duration {
        // Saturating: an instance made outside a paused runtime may be anchored
        // ahead of that runtime's clock.
        let elapsed = Instant::now().saturating_duration_since(self.anchor);
        let scaled = if self.rate == 1.0 {
            // Exact, where the float product would round after ~100 days.
            elapsed
        } else {
            Duration::try_from_secs_f64(elapsed.as_secs_f64() * self.rate).unwrap_or(Duration::MAX)
        };
        self.at.saturating_add(scaled)
    }

    pub(super) fn rate(&self) -> f64 {
        self.rate
    }
}

impl MemoryInstance {
    /// Makes the instance's clock run `rate` times as fast as Tokio's from now on
    /// (1.0 at first), without a jump. A key's TTL is counted on this clock, so at
    /// rate 2 a key set for 2 s is gone after 1 s of Tokio time: a server whose
    /// clock runs fast lets a lock go early, which the drift factor must cover.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when `rate` is not finite or not positive.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build()?.block_on(async {
    /// use std::time::Duration;
    /// use quorumlock::{MemoryInstance, QuorumLocker};
    ///
    /// let fast = MemoryInstance::new("fast");
    /// fast.set_clock_rate(2.0)?;
    /// let locker = QuorumLocker::builder().memory(&fast).build().await?;
    /// let _lock = locker.acquire("job", Duration::from_secs(2)).await?;
    ///
    /// // Time is paused: advancing it costs nothing.
    /// tokio::time::advance(Duration::from_millis(999)).await;
    /// assert!(fast.get("job").is_some());
    /// tokio::time::advance(Duration::from_millis(1)).await;
    /// assert_eq!(fast.get("job"), None);
    /// # Ok::<_, quorumlock::Error>(())
    /// # })?;
    /// # Ok(()) }
    /// ```
    pub fn set_clock_rate(&self, rate: f64) -> crate::Result<()> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(Error::InvalidConfig {
                setting: "clock_rate",
                reason: format!("{rate} is not a finite number above 0"),
            });
        }
        let mut state = self.state();
        state.clock = Clock {
            anchor: Instant::now(),
            at: state.clock.now(),
            rate,
        };
        Ok(())
    }

    /// The rate set with [`set_clock_rate`](Self::set_clock_rate).
    pub fn clock_rate(&self) -> f64 {
        self.state().clock.rate
    }

    /// The instance's clock, since the Unix epoch: what `TIME` would answer.
    pub fn now(&self) -> Duration {
        self.state().clock.now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::memory::testkit::arc;
    use crate::instance::Instance;

    #[tokio::test(start_paused = true)]
    async fn probe_reads_the_scaled_clock() {
        let instance = MemoryInstance::new("m");
        let start = instance
            .probe(&arc("quorumlock:epoch"), &arc("e1"))
            .await
            .unwrap()
            .server_time;
        instance.set_clock_rate(3.0).unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        let later = instance
            .probe(&arc("quorumlock:epoch"), &arc("e1"))
            .await
            .unwrap()
            .server_time;
        assert_eq!(later - start, Duration::from_secs(6));
        assert_eq!(instance.now(), later);
    }
}
