//! Background work the locker owes (rollbacks, releases of stragglers), counted so
//! that callers can wait for it to finish.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Spawns tasks on the current Tokio runtime and counts those still running.
#[derive(Clone)]
pub(crate) struct Background {
    running: Arc<watch::Sender<usize>>,
}

/// Decrements the count when its task ends, finishes or is dropped by a runtime
/// shutting down.
struct Running(Arc<watch::Sender<usize>>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.send_modify(|running| *running -= 1);
    }
}

impl Background {
    pub(crate) fn new() -> Self {
        Self {
            running: Arc::new(watch::Sender::new(0)),
        }
    }

    /// Spawns `task`; returns `None`, dropping it, where there is no runtime (a
    /// drop outside any runtime has nowhere to run its cleanup). Dropping the
    /// handle does not stop the task.
    pub(crate) fn spawn<F>(&self, task: F) -> Option<JoinHandle<()>>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        self.running.send_modify(|running| *running += 1);
        let running = Running(Arc::clone(&self.running));
        Some(runtime.spawn(async move {
            let _running = running;
            task.await;
        }))
    }

    /// Resolves once no background task is running.
    pub(crate) async fn idle(&self) {
        let mut running = self.running.subscribe();
        // The sender lives in `self`, so `wait_for` cannot fail here.
        let _ = running.wait_for(|count| *count == 0).await;
    }
}
