//! [`MemoryInstance`] behind the instance seam: each operation is one request
//! (see `faults`) whose work is the matching script's (see `store`).

use std::sync::Arc;
use std::time::Duration;

use redis::RedisError;

use super::MemoryInstance;
use crate::instance::{BoxFuture, Instance, Peeked, Probe, PubSubSource, Reply, Request};

impl Instance for MemoryInstance {
    fn eval(&self, request: &Request<'_>) -> BoxFuture<Reply> {
        match *request {
            Request::Grant {
                key,
                value,
                ttl_ms,
                retake,
                fence,
                epoch,
            } => {
                let (key, value) = (Arc::clone(key), Arc::clone(value));
                let (retake, fence, epoch) = (retake.cloned(), fence.cloned(), epoch.cloned());
                self.run(move |store, now| {
                    let granted = store.checked(epoch.as_ref(), ttl_ms, |store| match &retake {
                        None => store.set_nx_px(&key, &value, ttl_ms, now),
                        Some(token) => store.retake(&key, token, &value, ttl_ms, now),
                    });
                    match &fence {
                        None => granted.map(u64::from),
                        Some(fence) => store.fenced(granted, fence, now),
                    }
                })
            }
            Request::Extend {
                key,
                value,
                ttl_ms,
                epoch_key,
            } => {
                let (key, value, epoch_key) =
                    (Arc::clone(key), Arc::clone(value), epoch_key.cloned());
                self.run(move |store, now| {
                    let extended = store.extend(&key, &value, ttl_ms, now)?;
                    if extended {
                        store.raise(epoch_key.as_ref(), ttl_ms);
                    }
                    Ok(u64::from(extended))
                })
            }
            Request::Release {
                key,
                value,
                publish,
            } => {
                let (key, value) = (Arc::clone(key), Arc::clone(value));
                let published =
                    publish.map(|(channel, message)| (Arc::clone(channel), Arc::clone(message)));
                let sender = self.inner.published.clone();
                self.run(move |store, now| {
                    let released = store.release(&key, &value, now)?;
                    if let (true, Some(published)) = (released, published) {
                        // No subscriber is not an error, as PUBLISH answers 0.
                        let _ = sender.send(published);
                    }
                    Ok(u64::from(released))
                })
            }
            Request::FenceWriteBack {
                key,
                fence,
                value,
                token,
            } => {
                let (key, fence, value) = (Arc::clone(key), Arc::clone(fence), Arc::clone(value));
                self.run(move |store, now| {
                    store
                        .fence_write_back(&key, &fence, &value, token, now)
                        .map(u64::from)
                })
            }
        }
    }

    fn pubsub(&self) -> Option<PubSubSource> {
        Some(PubSubSource::InProcess(self.inner.published.clone()))
    }

    fn peek(&self, key: &Arc<str>) -> BoxFuture<Result<Option<Peeked>, RedisError>> {
        let key = Arc::clone(key);
        // Not a lock command: it does not count in `commands()`.
        self.send(false, move |store, now| {
            Ok(store
                .peek(&key, now)
                .map(|(value, ttl)| Peeked { value, ttl }))
        })
    }

    fn load_scripts(&self) -> BoxFuture<Result<(), RedisError>> {
        self.send(false, |_, _| Ok(()))
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
                other_clocks: Vec::new(),
                changed_ago: None,
                epoch,
                longest_ttl: Duration::from_millis(longest_ms).min(crate::MAX_TTL),
            })
        })
    }
}

/// The old per-script calls, for the memory instance's own tests.
#[cfg(test)]
impl MemoryInstance {
    pub(super) fn set_nx_px(
        &self,
        key: &Arc<str>,
        value: &Arc<str>,
        ttl_ms: u64,
        epoch: Option<&crate::epoch::Epoch>,
    ) -> BoxFuture<Result<bool, RedisError>> {
        self.grant(key, None, value, ttl_ms, epoch)
    }

    pub(super) fn retake(
        &self,
        key: &Arc<str>,
        token: &Arc<str>,
        value: &Arc<str>,
        ttl_ms: u64,
        epoch: Option<&crate::epoch::Epoch>,
    ) -> BoxFuture<Result<bool, RedisError>> {
        self.grant(key, Some(token), value, ttl_ms, epoch)
    }

    fn grant(
        &self,
        key: &Arc<str>,
        retake: Option<&Arc<str>>,
        value: &Arc<str>,
        ttl_ms: u64,
        epoch: Option<&crate::epoch::Epoch>,
    ) -> BoxFuture<Result<bool, RedisError>> {
        done(self.eval(&Request::Grant {
            key,
            value,
            ttl_ms,
            retake,
            fence: None,
            epoch,
        }))
    }

    pub(super) fn extend(
        &self,
        key: &Arc<str>,
        value: &Arc<str>,
        ttl_ms: u64,
        epoch_key: Option<&Arc<str>>,
    ) -> BoxFuture<Result<bool, RedisError>> {
        let request = Request::Extend {
            key,
            value,
            ttl_ms,
            epoch_key,
        };
        done(self.eval(&request))
    }

    pub(super) fn release(
        &self,
        key: &Arc<str>,
        value: &Arc<str>,
    ) -> BoxFuture<Result<bool, RedisError>> {
        let request = Request::Release {
            key,
            value,
            publish: None,
        };
        done(self.eval(&request))
    }
}

/// A reply as "done or not", as the tests read it.
#[cfg(test)]
fn done(reply: BoxFuture<Reply>) -> BoxFuture<Result<bool, RedisError>> {
    Box::pin(async move { Ok(reply.await? > 0) })
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
