//! Background work the locker owes (rollbacks, releases of stragglers), counted so
//! that callers can wait for it to finish.
//!
//! Most cycles leave some: the replies of the instances slower than the quorum.
//! Rather than spawn a task for each, one reaper task per locker polls them all;
//! a spawn per cycle was a tenth of a cycle's CPU.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use tokio::sync::{mpsc, watch};

use crate::metrics;

type Task = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Runs tasks on the current Tokio runtime and counts those still running.
#[derive(Clone)]
pub(crate) struct Background {
    running: Arc<watch::Sender<usize>>,
    /// The reaper's queue, once started; a new one replaces it when the runtime
    /// that ran the old one has shut down.
    reaper: Arc<Mutex<Option<mpsc::UnboundedSender<Task>>>>,
}

/// Decrements the count when its task ends, finishes or is dropped by a runtime
/// shutting down.
struct Counted(Arc<watch::Sender<usize>>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.send_modify(|running| {
            *running -= 1;
            metrics::background(*running);
        });
    }
}

impl Background {
    pub(crate) fn new() -> Self {
        Self {
            running: Arc::new(watch::Sender::new(0)),
            reaper: Arc::new(Mutex::new(None)),
        }
    }

    /// Runs `task` in the background; returns `None`, dropping it, where there is
    /// no runtime (a drop outside any runtime has nowhere to run its cleanup).
    pub(crate) fn spawn<F>(&self, task: F) -> Option<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        self.running.send_modify(|running| {
            *running += 1;
            metrics::background(*running);
        });
        let running = Counted(Arc::clone(&self.running));
        // Caught here: a panic in one task (a user's connection, a tracing layer)
        // must not take the reaper, and every other rollback, down with it.
        let mut task: Task = Box::pin(async move {
            let _running = running;
            let _ = AssertUnwindSafe(task).catch_unwind().await;
        });
        let mut reaper = self.reaper.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(queue) = reaper.as_ref() {
            match queue.send(task) {
                Ok(()) => return Some(()),
                // The reaper's runtime is gone: start another on this one.
                Err(mpsc::error::SendError(returned)) => task = returned,
            }
        }
        let (queue, tasks) = mpsc::unbounded_channel();
        runtime.spawn(reap(tasks));
        // The receiver is alive: it was just handed to the reaper.
        let _ = queue.send(task);
        *reaper = Some(queue);
        Some(())
    }

    /// Resolves once no background task is running.
    pub(crate) async fn idle(&self) {
        let mut running = self.running.subscribe();
        // The sender lives in `self`, so `wait_for` cannot fail here.
        let _ = running.wait_for(|count| *count == 0).await;
    }
}

/// Polls every queued task until the locker is gone and the last task is done.
async fn reap(mut queue: mpsc::UnboundedReceiver<Task>) {
    let mut tasks = FuturesUnordered::new();
    loop {
        // Take whatever is queued, then poll: a busy queue must not keep the
        // tasks themselves from running.
        loop {
            match queue.try_recv() {
                Ok(task) => tasks.push(task),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    while tasks.next().await.is_some() {}
                    return;
                }
            }
        }
        tokio::select! {
            task = queue.recv() => match task {
                Some(task) => tasks.push(task),
                None => break,
            },
            Some(()) = tasks.next(), if !tasks.is_empty() => {}
        }
    }
    while tasks.next().await.is_some() {}
}
