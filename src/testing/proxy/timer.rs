//! The precise timer: a timerfd on Linux, so that sub-millisecond latencies
//! hold where Tokio's timer has millisecond ticks. Apart as platform code that
//! the connection only arms and awaits.

use std::io;
use std::time::Duration;

use tokio::time::Instant;

/// A one-shot timerfd on `CLOCK_MONOTONIC`, registered with the runtime's I/O
/// driver: it wakes the task within microseconds of its deadline, where Tokio's
/// timer wheel has millisecond ticks.
#[cfg(target_os = "linux")]
pub(super) struct PreciseTimer {
    fd: tokio::io::unix::AsyncFd<rustix::fd::OwnedFd>,
    /// The release it is armed for, until it fires: re-arming for the same one,
    /// as every turn of the connection's loop asks, is skipped.
    armed: Option<Instant>,
}

#[cfg(target_os = "linux")]
impl PreciseTimer {
    /// A new timer, or `None` (logged) if the kernel gives none, e.g. out of file
    /// descriptors.
    pub(super) fn new(id: u64) -> Option<Self> {
        Self::create()
            .inspect_err(|error| {
                tracing::debug!(id, %error, "fault proxy: no timerfd, latency in whole ms");
            })
            .ok()
    }

    fn create() -> io::Result<Self> {
        use rustix::time::{timerfd_create, TimerfdClockId, TimerfdFlags};
        let flags = TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC;
        let fd = timerfd_create(TimerfdClockId::Monotonic, flags)?;
        // `AsyncFd::register_with_interest` needs tokio 1.51.6 or 1.53.3; the manifest
        // allows 1.40. What the deprecation is about cannot happen here: the `OwnedFd`
        // is owned by the `AsyncFd` and stays open, the same fd, until it is dropped.
        #[allow(deprecated)]
        let fd = tokio::io::unix::AsyncFd::with_interest(fd, tokio::io::Interest::READABLE)?;
        Ok(Self { fd, armed: None })
    }

    /// Arms the timer to fire at `release`, replacing any earlier deadline.
    pub(super) fn arm(&mut self, release: Instant) -> io::Result<()> {
        use rustix::time::{timerfd_settime, Itimerspec, TimerfdTimerFlags, Timespec};
        if self.armed == Some(release) {
            return Ok(());
        }
        // Relative to now rather than absolute: neither `std` nor Tokio tells the
        // CLOCK_MONOTONIC reading of an `Instant`, and the syscall follows within a
        // microsecond. Never zero, which would disarm the timer instead.
        let wait = release
            .saturating_duration_since(Instant::now())
            .max(Duration::from_nanos(1));
        let value = Itimerspec {
            it_interval: Timespec::default(),
            it_value: Timespec {
                tv_sec: wait.as_secs().try_into().unwrap_or(i64::MAX),
                // Under a billion: fits whatever `Nsecs` is (a C long on some targets).
                tv_nsec: wait.subsec_nanos() as _,
            },
        };
        timerfd_settime(self.fd.get_ref(), TimerfdTimerFlags::empty(), &value)?;
        self.armed = Some(release);
        Ok(())
    }

    /// Waits until the armed deadline passes. Cancel safe: an expiry not yet read
    /// stays in the timerfd (and `armed` with it) for the next call.
    pub(super) async fn expired(&mut self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            // Eight bytes, the number of expiries; `WouldBlock` (the readiness was
            // stale, e.g. from before a re-arm) clears the readiness and waits again.
            let read = guard.try_io(|fd| {
                let mut count = [0; 8];
                rustix::io::read(fd.get_ref(), &mut count).map_err(io::Error::from)
            });
            if let Ok(read) = read {
                self.armed = None;
                return read.map(drop);
            }
        }
    }
}

/// Never made off Linux, where Tokio's timer is the only one.
#[cfg(not(target_os = "linux"))]
pub(super) enum PreciseTimer {}

#[cfg(not(target_os = "linux"))]
impl PreciseTimer {
    pub(super) fn new(_id: u64) -> Option<Self> {
        None
    }

    pub(super) fn arm(&mut self, _release: Instant) -> io::Result<()> {
        match *self {}
    }

    pub(super) async fn expired(&mut self) -> io::Result<()> {
        match *self {}
    }
}
