//! The instance seam: the few operations the quorum logic needs from one Redis
//! instance. Every operation returns a `'static` future so that a reply still in
//! flight when an attempt is decided can be finished in the background.

pub(crate) mod memory;
pub(crate) mod redis;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::epoch::Epoch;

/// A boxed, sendable, `'static` future.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// `Ok(true)`: the instance did it; `Ok(false)`: it refused; `Err`: no answer.
pub(crate) type Reply = Result<bool, ::redis::RedisError>;

/// A fenced first round's answer: the key's fencing counter after the `INCR` where
/// the instance set the key, `0` where it refused.
pub(crate) type Counter = Result<u64, ::redis::RedisError>;

/// Where an instance's release messages can be heard, if anywhere.
#[derive(Clone)]
pub(crate) enum PubSubSource {
    /// A server reached by URL: a dedicated subscription connection opens from it.
    Redis(Box<::redis::Client>),
    /// An in-process instance: its releases are broadcast in-process.
    Memory(memory::MemoryInstance),
}

/// What an instance says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Probe {
    /// The server's `run_id`: it changes on every restart.
    pub(crate) run_id: String,
    /// The server's clock (`TIME`), since the Unix epoch.
    pub(crate) server_time: Duration,
    /// The epoch hash's id (see `epoch`), written by this probe where it was
    /// missing.
    pub(crate) epoch: Arc<str>,
    /// The longest TTL any locker has set on the server (the hash's `ttl`).
    pub(crate) longest_ttl: Duration,
}

/// One lock instance. `value` is what the key holds for its owner: the token,
/// followed by the lock's metadata if it has any.
///
/// The four ways to grant take an `epoch`: where given, the instance grants only
/// if the epoch hash holds the epoch's id and the server's `run_id` is the
/// epoch's, and otherwise answers [`epoch::changed`](crate::epoch::changed)
/// without setting anything; a grant also raises the longest TTL kept there.
pub(crate) trait Instance: Send + Sync + 'static {
    /// `SET key value NX PX ttl_ms`: true if the key was set.
    fn set_nx_px(
        &self,
        key: &Arc<str>,
        value: &Arc<str>,
        ttl_ms: u64,
        epoch: Option<&Epoch>,
    ) -> BoxFuture<Reply>;

    /// As `set_nx_px`, and also true where the key already holds a value with this
    /// `token` (the token alone, or the token, a space and metadata): that value is
    /// then replaced by `value`, with the TTL `ttl_ms`.
    fn retake(
        &self,
        key: &Arc<str>,
        token: &Arc<str>,
        value: &Arc<str>,
        ttl_ms: u64,
        epoch: Option<&Epoch>,
    ) -> BoxFuture<Reply>;

    /// Compare-and-pexpire: true if the key held `value` and now expires in
    /// `ttl_ms`; with `epoch_key`, also raises the longest TTL kept there.
    fn extend(
        &self,
        key: &Arc<str>,
        value: &Arc<str>,
        ttl_ms: u64,
        epoch_key: Option<&Arc<str>>,
    ) -> BoxFuture<Reply>;

    /// Compare-and-delete: true if the key held `value` and was deleted.
    fn release(&self, key: &Arc<str>, value: &Arc<str>) -> BoxFuture<Reply>;

    /// The first round of a fenced attempt: `SET key value NX PX ttl_ms` and, only
    /// where it set the key, `INCR fence`.
    fn fenced_set(
        &self,
        key: &Arc<str>,
        fence: &Arc<str>,
        value: &Arc<str>,
        ttl_ms: u64,
        epoch: Option<&Epoch>,
    ) -> BoxFuture<Counter>;

    /// As `retake`, and `INCR fence` where it granted.
    fn fenced_retake(
        &self,
        key: &Arc<str>,
        fence: &Arc<str>,
        token: &Arc<str>,
        value: &Arc<str>,
        ttl_ms: u64,
        epoch: Option<&Epoch>,
    ) -> BoxFuture<Counter>;

    /// The second round of a fenced attempt: where `key` still holds `value`,
    /// `fence = max(fence, token)`; true if the key held `value`.
    fn fence_write_back(
        &self,
        key: &Arc<str>,
        fence: &Arc<str>,
        value: &Arc<str>,
        token: u64,
    ) -> BoxFuture<Reply>;

    /// As `release`, and where it deleted, `PUBLISH channel message`.
    fn release_publish(
        &self,
        key: &Arc<str>,
        value: &Arc<str>,
        channel: &Arc<str>,
        message: &Arc<str>,
    ) -> BoxFuture<Reply>;

    /// Whether a reconnect of its connection always fails a request first (so
    /// the monitor suspects the instance): then grants need not check the
    /// server's `run_id`, which costs the server an `INFO` each. True for the
    /// locker's own RESP2 connections; a RESP3 connection manager reconnects at
    /// the disconnect push, and a user's connection may do anything.
    fn sees_reconnects(&self) -> bool {
        false
    }

    /// Where release messages can be heard: `None` for a connection the user
    /// made (we cannot open another one like it).
    fn pubsub(&self) -> Option<PubSubSource> {
        None
    }

    /// Loads every script, so later calls need no `NOSCRIPT` round trip.
    fn load_scripts(&self) -> BoxFuture<Reply>;

    /// The server's identity, clock and epoch, in one round trip; `candidate`
    /// is written under `epoch_key` where nothing is there (`SET NX`).
    fn probe(
        &self,
        epoch_key: &Arc<str>,
        candidate: &Arc<str>,
    ) -> BoxFuture<Result<Probe, ::redis::RedisError>>;
}
