//! [`MemoryInstance`] behind the instance seam: each operation is one request
//! (see `faults`) whose work is the matching script's (see `store`).

use std::sync::Arc;
use std::time::Duration;

use redis::RedisError;

use super::MemoryInstance;
use crate::epoch::Epoch;
use crate::instance::{BoxFuture, Counter, Instance, Probe, PubSubSource, Reply};

impl Instance for MemoryInstance {
    fn set_nx_px(
        &self,
        key: &Arc<str>,
        value: &Arc<str>,
        ttl_ms: u64,
        epoch: Option<&Epoch>,
    ) -> BoxFuture<Reply> {
        let (key, value, epoch) = (Arc::clone(key), Arc::clone(value), epoch.cloned());
        self.run(move |store, now| {
            store.checked(epoch.as_ref(), ttl_ms, |store| {
                store.set_nx_px(&key, &value, ttl_ms, now)
            })
        })
    }

    fn retake(
        &self,
        key: &Arc<str>,
        token: &Arc<str>,
        value: &Arc<str>,
        ttl_ms: u64,
        epoch: Option<&Epoch>,
    ) -> BoxFuture<Reply> {
        let (key, token, value) = (Arc::clone(key), Arc::clone(token), Arc::clone(value));
        let epoch = epoch.cloned();
        self.run(move |store, now| {
            store.checked(epoch.as_ref(), ttl_ms, |store| {
                store.retake(&key, &token, &value, ttl_ms, now)
            })
        })
    }

    fn extend(
        &self,
        key: &Arc<str>,
        value: &Arc<str>,
        ttl_ms: u64,
        epoch_key: Option<&Arc<str>>,
    ) -> BoxFuture<Reply> {
        let (key, value, epoch_key) = (Arc::clone(key), Arc::clone(value), epoch_key.cloned());
        self.run(move |store, now| {
            let extended = store.extend(&key, &value, ttl_ms, now)?;
            if extended {
                store.raise(epoch_key.as_ref(), ttl_ms);
            }
            Ok(extended)
        })
    }

    fn release(&self, key: &Arc<str>, value: &Arc<str>) -> BoxFuture<Reply> {
        let (key, value) = (Arc::clone(key), Arc::clone(value));
        self.run(move |store, now| store.release(&key, &value, now))
    }

    fn fenced_set(
        &self,
        key: &Arc<str>,
        fence: &Arc<str>,
        value: &Arc<str>,
        ttl_ms: u64,
        epoch: Option<&Epoch>,
    ) -> BoxFuture<Counter> {
        let (key, fence, value) = (Arc::clone(key), Arc::clone(fence), Arc::clone(value));
        let epoch = epoch.cloned();
        self.run(move |store, now| {
            let granted = store.checked(epoch.as_ref(), ttl_ms, |store| {
                store.set_nx_px(&key, &value, ttl_ms, now)
            });
            store.fenced(granted, &fence, now)
        })
    }

    fn fenced_retake(
        &self,
        key: &Arc<str>,
        fence: &Arc<str>,
        token: &Arc<str>,
        value: &Arc<str>,
        ttl_ms: u64,
        epoch: Option<&Epoch>,
    ) -> BoxFuture<Counter> {
        let (key, fence) = (Arc::clone(key), Arc::clone(fence));
        let (token, value, epoch) = (Arc::clone(token), Arc::clone(value), epoch.cloned());
        self.run(move |store, now| {
            let granted = store.checked(epoch.as_ref(), ttl_ms, |store| {
                store.retake(&key, &token, &value, ttl_ms, now)
            });
            store.fenced(granted, &fence, now)
        })
    }

    fn fence_write_back(
        &self,
        key: &Arc<str>,
        fence: &Arc<str>,
        value: &Arc<str>,
        token: u64,
    ) -> BoxFuture<Reply> {
        let (key, fence, value) = (Arc::clone(key), Arc::clone(fence), Arc::clone(value));
        self.run(move |store, now| store.fence_write_back(&key, &fence, &value, token, now))
    }

    fn release_publish(
        &self,
        key: &Arc<str>,
        value: &Arc<str>,
        channel: &Arc<str>,
        message: &Arc<str>,
    ) -> BoxFuture<Reply> {
        let (key, value) = (Arc::clone(key), Arc::clone(value));
        let published = (Arc::clone(channel), Arc::clone(message));
        let sender = self.inner.published.clone();
        self.run(move |store, now| {
            let released = store.release(&key, &value, now)?;
            if released {
                // No subscriber is not an error, as PUBLISH answers 0.
                let _ = sender.send(published);
            }
            Ok(released)
        })
    }

    fn pubsub(&self) -> Option<PubSubSource> {
        Some(PubSubSource::Memory(self.clone()))
    }

    fn load_scripts(&self) -> BoxFuture<Reply> {
        self.send(false, |_, _| Ok(true))
    }

    fn probe(
        &self,
        epoch_key: &Arc<str>,
        candidate: &Arc<str>,
    ) -> BoxFuture<Result<Probe, RedisError>> {
        let (epoch_key, candidate) = (Arc::clone(epoch_key), Arc::clone(candidate));
        self.send(false, move |store, now| {
            let (epoch, longest_ms) = store.epoch(&epoch_key, &candidate);
            Ok(Probe {
                run_id: store.run_id.clone(),
                server_time: now,
                epoch,
                longest_ttl: Duration::from_millis(longest_ms).min(crate::MAX_TTL),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::memory::testkit::{arc, KEY};

    #[test]
    fn futures_are_send_and_static() {
        fn send_static<T: Send + 'static>(_: T) {}
        let instance = MemoryInstance::new("m");
        send_static(instance.set_nx_px(&arc(KEY), &arc("v"), 1, None));
        send_static(instance.clone());
    }
}
