//! STUB — being replaced by the in-memory instance implementation.

use std::sync::Arc;

use super::{BoxFuture, Instance, Probe, Reply};

/// An in-process lock instance (stub).
#[derive(Clone, Debug)]
pub struct MemoryInstance {
    name: Arc<str>,
}

impl MemoryInstance {
    /// A new, empty instance called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into().into(),
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn instance(&self) -> Box<dyn Instance> {
        Box::new(self.clone())
    }
}

fn refused() -> ::redis::RedisError {
    ::redis::RedisError::from((::redis::ErrorKind::Io, "stub"))
}

impl Instance for MemoryInstance {
    fn set_nx_px(&self, _: &Arc<str>, _: &Arc<str>, _: u64) -> BoxFuture<Reply> {
        Box::pin(async { Err(refused()) })
    }
    fn retake(&self, _: &Arc<str>, _: &Arc<str>, _: u64) -> BoxFuture<Reply> {
        Box::pin(async { Err(refused()) })
    }
    fn extend(&self, _: &Arc<str>, _: &Arc<str>, _: u64) -> BoxFuture<Reply> {
        Box::pin(async { Err(refused()) })
    }
    fn release(&self, _: &Arc<str>, _: &Arc<str>) -> BoxFuture<Reply> {
        Box::pin(async { Err(refused()) })
    }
    fn load_scripts(&self) -> BoxFuture<Reply> {
        Box::pin(async { Ok(true) })
    }
    fn probe(&self) -> BoxFuture<Result<Probe, ::redis::RedisError>> {
        Box::pin(async { Err(refused()) })
    }
}
