//! The instance seam: the few operations the quorum logic needs from one Redis
//! instance. Every operation returns a `'static` future so that a reply still in
//! flight when an attempt is decided can be finished in the background.

pub(crate) mod redis;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A boxed, sendable, `'static` future.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// `Ok(true)`: the instance did it; `Ok(false)`: it refused; `Err`: no answer.
pub(crate) type Reply = Result<bool, ::redis::RedisError>;

/// One lock instance.
pub(crate) trait Instance: Send + Sync + 'static {
    /// `SET key token NX PX ttl_ms`: true if the key was set.
    fn set_nx_px(&self, key: &Arc<str>, token: &Arc<str>, ttl_ms: u64) -> BoxFuture<Reply>;

    /// Compare-and-delete: true if the key held `token` and was deleted.
    fn release(&self, key: &Arc<str>, token: &Arc<str>) -> BoxFuture<Reply>;

    /// Loads every script, so later calls need no `NOSCRIPT` round trip.
    fn load_scripts(&self) -> BoxFuture<Reply>;
}

/// An instance in the locker's order, with the name it is shown by.
pub(crate) struct Member {
    pub(crate) index: usize,
    pub(crate) address: Arc<str>,
    pub(crate) instance: Box<dyn Instance>,
}
