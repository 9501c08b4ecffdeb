//! The identity of an instance's data set. On first contact the locker writes a
//! random value under [`EPOCH_KEY`] (`SET NX`, no TTL), and every grant checks,
//! in the same script as the `SET NX PX`, that the key still holds the value the
//! locker verified. A server that lost its keys — restarted empty, flushed, or
//! failed over to a replica that never had the key — loses this one too, so its
//! grant is refused and reported however the connection behaved: a connection
//! that reconnected by itself breaks no request, and `run_id` is only read by
//! the next probe.

use std::io;
use std::sync::Arc;

use redis::RedisError;

use crate::token;

/// The key, after the locker's key prefix, that holds the data set's identity:
/// one per server and prefix, never expiring, like the fencing counters. A lock
/// key of this name is refused.
pub const EPOCH_KEY: &str = "quorumlock:epoch";

/// What a grant must find under the epoch key: the key and the value.
#[derive(Debug, Clone)]
pub(crate) struct Epoch {
    pub(crate) key: Arc<str>,
    pub(crate) value: Arc<str>,
}

impl Epoch {
    /// A fresh value to write where the key is missing.
    pub(crate) fn generate() -> Result<Arc<str>, RedisError> {
        token::generate().map_err(|err| RedisError::from(io::Error::other(err.to_string())))
    }
}

/// Why a grant was refused: the data set is not the one the locker verified.
#[derive(Debug)]
struct Changed;

impl std::fmt::Display for Changed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "its data set changed since it was verified (restart, flush or failover): the grant was not made",
        )
    }
}

impl std::error::Error for Changed {}

/// The error a grant answers when the epoch key does not hold the verified
/// value. An I/O kind, so that every path that handles a broken connection (a
/// failed vote, a probe soon) handles this too.
pub(crate) fn changed() -> RedisError {
    RedisError::from(io::Error::other(Changed))
}

/// Whether `err` is [`changed`]'s.
pub(crate) fn is_changed(err: &RedisError) -> bool {
    type Shared = Arc<dyn std::error::Error + Send + Sync>;
    let Some(source) = std::error::Error::source(err) else {
        return false;
    };
    // redis-rs keeps the I/O error behind an `Arc`.
    let io = match source.downcast_ref::<Shared>() {
        Some(shared) => shared.downcast_ref::<io::Error>(),
        None => source.downcast_ref::<io::Error>(),
    };
    io.and_then(io::Error::get_ref)
        .is_some_and(|inner| inner.is::<Changed>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_changed_error_is_recognised_and_reads_as_one_line() {
        let err = changed();
        assert!(is_changed(&err));
        assert!(err.is_io_error());
        assert!(!is_changed(&RedisError::from(io::Error::other("reset"))));
        assert!(err.to_string().contains("data set changed"), "{err}");
        assert!(!err.to_string().contains('\n'));
    }
}
