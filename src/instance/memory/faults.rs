//! The faults an instance can be put through, and the way each request
//! travels to it, which is where they bite: half the round trip there, refused
//! while failing, queued while paused, half the round trip back.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use redis::RedisError;
use tokio::sync::oneshot;

use super::store::Store;
use super::{Inner, MemoryInstance};
use crate::instance::BoxFuture;

/// A request waiting for `resume`; it sends its own reply.
pub(super) type Queued = Box<dyn FnOnce(&mut Store, Duration) + Send>;

/// What happened to a request when it reached the instance.
enum Arrival<T> {
    Answered(Result<T, RedisError>),
    Queued(oneshot::Receiver<Result<T, RedisError>>),
}

impl MemoryInstance {
    /// Sets the round trip of every operation started from now on: the request
    /// takes half of it to reach the instance, the reply the other half. A
    /// request whose future is dropped before it arrives is never applied, as
    /// one lost on the wire. Operations already started keep their latency.
    pub fn set_latency(&self, round_trip: Duration) {
        self.state().latency = round_trip;
    }

    /// The round trip set with [`set_latency`](Self::set_latency) (zero at first).
    pub fn latency(&self) -> Duration {
        self.state().latency
    }

    /// While `failing`, every request that arrives is answered with an error of
    /// kind [`redis::ErrorKind::Io`] (connection refused) after the usual latency,
    /// and not applied: the instance looks unreachable. This takes precedence over
    /// [`pause`](Self::pause); requests already waiting in a paused instance still
    /// apply at [`resume`](Self::resume).
    pub fn set_failing(&self, failing: bool) {
        self.state().failing = failing;
    }

    /// Whether the instance is failing.
    pub fn is_failing(&self) -> bool {
        self.state().failing
    }

    /// Stops the instance, as `SIGSTOP` stops a server: requests that arrive
    /// wait, unanswered, and are applied in arrival order at
    /// [`resume`](Self::resume) — even those whose caller stopped waiting, as the
    /// server has already read them. Keys still expire by the instance's clock.
    pub fn pause(&self) {
        self.state().paused = true;
    }

    /// Lets a paused instance run again; the requests that arrived meanwhile are
    /// applied before this returns, and their replies leave.
    pub fn resume(&self) {
        let mut state = self.state();
        state.paused = false;
        let now = state.clock.now();
        let queued = std::mem::take(&mut state.queued);
        state.commands += queued.iter().filter(|(counted, _)| *counted).count() as u64;
        for (_, request) in queued {
            request(&mut state.store, now);
        }
    }

    /// Whether the instance is paused.
    pub fn is_paused(&self) -> bool {
        self.state().paused
    }

    /// Restarts the instance without persistence: every key is forgotten and the
    /// run id (from `INFO server`) changes. Requests waiting in a paused instance
    /// fail as their connections would. Latency, failing, pause and the clock are
    /// unchanged.
    pub fn restart_empty(&self) {
        let mut state = self.state();
        state.store = Store::new();
        // Dropping the requests drops their reply channels: their callers see a
        // reset connection.
        state.queued.clear();
    }
}

impl MemoryInstance {
    /// Sends `apply` as one request: it arrives after half the round trip, is
    /// applied (or refused, or queued while paused), and its answer comes back
    /// after the other half.
    pub(super) fn run<T, F>(&self, apply: F) -> BoxFuture<Result<T, RedisError>>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store, Duration) -> Result<T, RedisError> + Send + 'static,
    {
        self.send(true, apply)
    }

    /// As `run`, for a request that is not a lock command (`counted` false).
    pub(super) fn send<T, F>(&self, counted: bool, apply: F) -> BoxFuture<Result<T, RedisError>>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store, Duration) -> Result<T, RedisError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let round_trip = inner.state().latency;
        Box::pin(async move {
            let there = round_trip / 2;
            wait(there).await;
            let answer = match inner.arrive(counted, apply) {
                Arrival::Answered(answer) => answer,
                Arrival::Queued(reply) => reply.await.unwrap_or_else(|_| {
                    Err(io_error(
                        io::ErrorKind::ConnectionReset,
                        format!("memory instance {} restarted (simulated)", inner.name),
                    ))
                }),
            };
            wait(round_trip - there).await;
            answer
        })
    }
}

impl Inner {
    fn arrive<T, F>(&self, counted: bool, apply: F) -> Arrival<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store, Duration) -> Result<T, RedisError> + Send + 'static,
    {
        let mut state = self.state();
        if state.failing {
            state.commands += u64::from(counted);
            return Arrival::Answered(Err(io_error(
                io::ErrorKind::ConnectionRefused,
                format!("memory instance {} is failing (simulated)", self.name),
            )));
        }
        if state.paused {
            let (reply, answer) = oneshot::channel();
            state.queued.push((
                counted,
                Box::new(move |store, now| {
                    // The caller may have stopped waiting; the request applies anyway.
                    let _ = reply.send(apply(store, now));
                }),
            ));
            return Arrival::Queued(answer);
        }
        state.commands += u64::from(counted);
        let now = state.clock.now();
        Arrival::Answered(apply(&mut state.store, now))
    }
}

async fn wait(delay: Duration) {
    // A zero-latency operation then completes in the poll that starts it.
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

fn io_error(kind: io::ErrorKind, message: String) -> RedisError {
    RedisError::from(io::Error::new(kind, message))
}

#[cfg(test)]
mod tests {
    use redis::ErrorKind;
    use tokio::time::Instant;

    use super::*;
    use crate::instance::memory::testkit::{arc, KEY};
    use crate::instance::Instance;

    #[tokio::test(start_paused = true)]
    async fn restart_empty_forgets_keys_and_changes_the_run_id() {
        let instance = MemoryInstance::new("m");
        let before = instance
            .probe(&arc("quorumlock:epoch"), &arc("e1"))
            .await
            .unwrap();
        assert_eq!(before.run_id.len(), 40);
        assert!(before.run_id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(
            instance
                .probe(&arc("quorumlock:epoch"), &arc("e1"))
                .await
                .unwrap()
                .run_id,
            before.run_id
        );

        instance.set(KEY, "v", None);
        instance.restart_empty();
        let after = instance
            .probe(&arc("quorumlock:epoch"), &arc("e1"))
            .await
            .unwrap();
        assert_ne!(after.run_id, before.run_id);
        assert_eq!(after.run_id.len(), 40);
        assert!(instance.keys().is_empty());
        assert_ne!(
            MemoryInstance::new("n")
                .probe(&arc("quorumlock:epoch"), &arc("e1"))
                .await
                .unwrap()
                .run_id,
            after.run_id
        );
    }

    #[tokio::test(start_paused = true)]
    async fn restart_fails_requests_waiting_in_a_paused_instance() {
        let instance = MemoryInstance::new("m");
        instance.pause();
        let waiting = tokio::spawn(instance.set_nx_px(&arc(KEY), &arc("v"), 1000, None));
        tokio::task::yield_now().await;
        instance.restart_empty();
        let err = waiting.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Io);
        instance.resume();
        assert_eq!(instance.get(KEY), None);
        assert_eq!(instance.commands(), 0);
    }

    /// The request lands after half the round trip and the reply after the other
    /// half; a request dropped on the way never lands.
    #[tokio::test(start_paused = true)]
    async fn latency_splits_into_request_and_reply() {
        let instance = MemoryInstance::new("m");
        instance.set_latency(Duration::from_millis(100));
        let start = Instant::now();
        let mut set = instance.set_nx_px(&arc(KEY), &arc("v"), 1000, None);
        let early = tokio::time::timeout(Duration::from_millis(49), &mut set).await;
        assert!(early.is_err());
        assert_eq!(instance.get(KEY), None);
        let landed = tokio::time::timeout(Duration::from_millis(2), &mut set).await;
        assert!(landed.is_err(), "the reply is still on its way");
        assert_eq!(instance.get(KEY).as_deref(), Some("v"));
        assert!(set.await.unwrap());
        assert_eq!(start.elapsed(), Duration::from_millis(100));

        // The latency is read when an operation starts.
        let release = instance.release(&arc(KEY), &arc("v"));
        instance.set_latency(Duration::ZERO);
        assert!(release.await.unwrap());
        assert_eq!(start.elapsed(), Duration::from_millis(200));

        instance.set_latency(Duration::from_millis(100));
        let lost = instance.set_nx_px(&arc(KEY), &arc("lost"), 1000, None);
        assert!(tokio::time::timeout(Duration::from_millis(49), lost)
            .await
            .is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(instance.get(KEY), None);
        assert_eq!(instance.commands(), 2);
    }

    /// A paused instance applies what reached it only on resume, in arrival
    /// order, even where the caller stopped waiting.
    #[tokio::test(start_paused = true)]
    async fn a_paused_instance_queues_requests_until_resumed() {
        let instance = MemoryInstance::new("m");
        instance.pause();
        let first = tokio::spawn(instance.set_nx_px(&arc(KEY), &arc("first"), 1000, None));
        let abandoned = instance.set_nx_px(&arc("other"), &arc("v"), 1000, None);
        assert!(tokio::time::timeout(Duration::from_secs(5), abandoned)
            .await
            .is_err());
        let second = tokio::spawn(instance.set_nx_px(&arc(KEY), &arc("second"), 1000, None));
        tokio::task::yield_now().await;
        assert!(instance.keys().is_empty());
        assert_eq!(instance.commands(), 0);
        assert!(!first.is_finished());

        instance.resume();
        assert_eq!(instance.keys(), ["job", "other"]);
        assert_eq!(instance.get(KEY).as_deref(), Some("first"));
        assert!(first.await.unwrap().unwrap());
        assert!(!second.await.unwrap().unwrap());
        assert_eq!(instance.commands(), 3);
    }
}
