//! The identity of an instance: its data set and its server process. On first
//! contact the locker writes a random `id` into the hash [`EPOCH_KEY`]
//! (`HSETNX`, no TTL), and every grant checks, in the same script as the `SET
//! NX PX`, that the hash still holds the id the locker verified and that the
//! server's `run_id` is the one it verified. A server that lost its keys —
//! restarted empty, flushed — lost the hash too; a replica promoted in a
//! failover has the hash (replicated long ago) but another `run_id`. Either way
//! its grant is refused, however the connection behaved: a connection that
//! reconnected by itself breaks no request, and the probes only look now and
//! then.
//!
//! The hash also keeps, under `ttl`, the longest TTL any locker has set on the
//! server: when another server loses its keys, its quarantine lasts that long.

use std::io;
use std::sync::Arc;

use redis::RedisError;

use crate::token;

/// What a grant must find: the epoch hash's key and its id, and the server's
/// `run_id` where the connection may reconnect without failing a request; and
/// whether the grant raises the hash's longest TTL.
#[derive(Debug, Clone)]
pub(crate) struct Epoch {
    /// The epoch hash's key (prefix included).
    pub(crate) key: Arc<str>,
    /// The data set's id, the hash's `id` field, as last read.
    pub(crate) id: Arc<str>,
    pub(crate) run_id: Option<Arc<str>>,
    pub(crate) raise: bool,
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
            "its data set or server changed since it was verified (restart, flush or failover): the grant was not made",
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
        assert!(
            err.to_string().contains("data set or server changed"),
            "{err}"
        );
        assert!(!err.to_string().contains('\n'));
    }
}
