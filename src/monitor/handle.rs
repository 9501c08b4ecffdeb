//! The probing task's handle, kept with the locker's shared state: whether the
//! task runs, whether its first measurements are in, and the signal that ends
//! it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// The probing task's handle: whether it still runs, and whether its first
/// measurements are in. It runs on the runtime that built the locker; a locker
/// used on after that runtime shut down (a static shared by tests, each with its
/// own runtime) starts it again on the current one, or instances whose
/// connection failed would never be verified again.
pub(crate) struct Monitor {
    running: Arc<AtomicBool>,
    /// Set once every instance has a measured clock or does not answer, or
    /// once [`WARM_UP`] has passed: a new locker's first attempt waits for it.
    warm: watch::Sender<bool>,
    /// Dropped with the locker: wakes the probe loops to end.
    closed: watch::Sender<()>,
}

/// The longest a new locker's first attempt waits for the clocks to be
/// measured: enough for a connection and a few probes [`MIN_INTERVAL`](crate::clock::MIN_INTERVAL) apart.
pub(crate) const WARM_UP: Duration = Duration::from_secs(2);

/// Clears the running flag when the task ends or its runtime drops it.
pub(crate) struct ProbeTask(Arc<AtomicBool>);

impl Drop for ProbeTask {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Monitor {
    pub(crate) fn new() -> Self {
        Self {
            running: Arc::new(AtomicBool::new(false)),
            warm: watch::Sender::new(false),
            closed: watch::Sender::new(()),
        }
    }

    /// Where the task does not run and there is a runtime to start it on: the
    /// runtime, and the mark the new task holds while it runs. One atomic load
    /// when it runs.
    pub(crate) fn claim(&self) -> Option<(tokio::runtime::Handle, ProbeTask)> {
        if self.running.load(Ordering::Acquire) {
            return None;
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        self.running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        Some((runtime, ProbeTask(Arc::clone(&self.running))))
    }

    /// Waits, at most [`WARM_UP`], for the first measurements of every
    /// instance: an instance votes only once its identity and clock are known,
    /// and without the wait a new locker's first attempt would find none.
    pub(crate) async fn warmed_up(&self) {
        if *self.warm.borrow() {
            return;
        }
        let mut warm = self.warm.subscribe();
        let _ = tokio::time::timeout(WARM_UP, warm.wait_for(|warm| *warm)).await;
        self.warm.send_replace(true);
    }

    /// Whether the warm-up is over.
    pub(crate) fn is_warm(&self) -> bool {
        *self.warm.borrow()
    }

    /// Ends the warm-up: no instance is worth waiting for.
    pub(crate) fn set_warm(&self) {
        self.warm.send_replace(true);
    }

    /// Resolves when the locker is dropped (its sender goes with it).
    pub(crate) fn closed(&self) -> watch::Receiver<()> {
        self.closed.subscribe()
    }
}
