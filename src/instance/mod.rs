//! The instance seam: the few operations the quorum logic needs from one Redis
//! instance. Every operation returns a `'static` future so that a reply still in
//! flight when an attempt is decided can be finished in the background.

#[cfg(feature = "cluster")]
pub(crate) mod cluster;
pub(crate) mod connect;
pub(crate) mod memory;
pub(crate) mod redis;
pub(crate) mod sentinel;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::epoch::Epoch;

/// A boxed, sendable, `'static` future.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// An instance's answer to a [`Request`]: what the script counted — 0 where it
/// refused, 1 where it did it, or for a fenced grant the fencing counter after
/// its `INCR`. A server that is not the one verified (a script's -1) answers
/// [`epoch::changed`](crate::epoch::changed); `Err` also for no answer.
pub(crate) type Reply = Result<u64, ::redis::RedisError>;

/// A script's answer as a [`Reply`]: its count, or -1 where the server is not
/// the one verified.
pub(crate) fn counted(answer: i64) -> Reply {
    match answer {
        -1 => Err(crate::epoch::changed()),
        answer => u64::try_from(answer).map_err(|_| {
            ::redis::RedisError::from((
                ::redis::ErrorKind::Client,
                "unexpected reply",
                format!("a script answered {answer}"),
            ))
        }),
    }
}

/// Whether an error means the connection (and so perhaps the server) went away.
pub(crate) fn is_connection_failure(err: &::redis::RedisError) -> bool {
    err.is_io_error() || err.is_connection_dropped() || err.is_connection_refusal()
}

/// Field `name` of the text of `INFO section`, as an unexpected reply where it
/// is missing.
pub(crate) fn info_field<'a>(
    info: &'a str,
    section: &str,
    name: &str,
) -> Result<&'a str, ::redis::RedisError> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
        .ok_or_else(|| {
            ::redis::RedisError::from((
                ::redis::ErrorKind::UnexpectedReturnType,
                "unexpected reply",
                format!("INFO {section} has no {name}"),
            ))
        })
}

/// What the quorum logic asks of one instance: each variant is one of the
/// crate's scripts (see `scripts`), as data. `value` is what the key holds for
/// its owner: the token, followed by the lock's metadata if it has any.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Request<'a> {
    /// `SET key value NX PX ttl_ms`; with `retake`, also where the key holds a
    /// value that starts with that token and a space (a value this token's
    /// holder set: token, nonce and metadata), which is then replaced by `value` with the new TTL; with
    /// `fence`, `INCR fence` where it granted, answering the counter. With
    /// `epoch`, the instance grants only if the epoch hash holds the epoch's id
    /// (and the server's `run_id` is the epoch's, where given), and raises the
    /// longest TTL kept there.
    Grant {
        key: &'a Arc<str>,
        value: &'a Arc<str>,
        ttl_ms: u64,
        retake: Option<&'a Arc<str>>,
        fence: Option<&'a Arc<str>>,
        epoch: Option<&'a Epoch>,
    },
    /// Compare-and-pexpire: where the key holds `value`, it now expires in
    /// `ttl_ms`; with `epoch_key`, also raises the longest TTL kept there.
    Extend {
        key: &'a Arc<str>,
        value: &'a Arc<str>,
        ttl_ms: u64,
        epoch_key: Option<&'a Arc<str>>,
    },
    /// Compare-and-delete; with `publish`, also `PUBLISH channel message`
    /// where it deleted.
    Release {
        key: &'a Arc<str>,
        value: &'a Arc<str>,
        publish: Option<(&'a Arc<str>, &'a Arc<str>)>,
    },
    /// The second round of a fenced attempt: where `key` still holds `value`,
    /// `fence = max(fence, token)`; 1 if the key held `value`.
    FenceWriteBack {
        key: &'a Arc<str>,
        fence: &'a Arc<str>,
        value: &'a Arc<str>,
        token: u64,
    },
}

/// A key's value and TTL left, as [`Instance::peek`] read them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Peeked {
    /// The value, as text (lossily, were it not UTF-8).
    pub(crate) value: String,
    /// `None` for a key without expiry.
    pub(crate) ttl: Option<Duration>,
}

/// Where an instance's release messages can be heard, if anywhere.
#[derive(Clone)]
pub(crate) enum PubSubSource {
    /// A server reached by URL: a dedicated subscription connection opens from it.
    Redis(Box<::redis::Client>),
    /// An in-process instance: its release messages, `(channel, message)`, are
    /// broadcast in-process.
    InProcess(tokio::sync::broadcast::Sender<(Arc<str>, Arc<str>)>),
    /// A server found anew at each (re)connection: a Sentinel member's primary.
    Resolved(Resolver),
}

/// Finds the client to subscribe through now.
pub(crate) type Resolver =
    Arc<dyn Fn() -> BoxFuture<Result<::redis::Client, ::redis::RedisError>> + Send + Sync>;

/// What an instance says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Probe {
    /// The server's `run_id`: it changes on every restart.
    pub(crate) run_id: String,
    /// The server's clock (`TIME`), since the Unix epoch.
    pub(crate) server_time: Duration,
    /// For a member of several servers (a cluster's primaries but the first),
    /// each one's `run_id` and clock, read in the same probe: a lock on the
    /// member lasts as long as the server holding its key lets it, so each
    /// clock's rate is measured.
    pub(crate) other_clocks: Vec<(Arc<str>, Duration)>,
    /// How long ago, by the server's clock, the server's own record says its
    /// identity changed (a failover that another locker's probe recorded
    /// first), where the instance keeps such a record: a locker that never
    /// saw the old server still sits out the rest of the quarantine.
    pub(crate) changed_ago: Option<Duration>,
    /// The epoch hash's id (see `epoch`), written by this probe where it was
    /// missing.
    pub(crate) epoch: Arc<str>,
    /// The longest TTL any locker has set on the server (the hash's `ttl`).
    pub(crate) longest_ttl: Duration,
}

/// One lock instance: it runs the crate's scripts (by [`Request`]), says who
/// it is (a probe), and may offer a way to hear releases.
pub(crate) trait Instance: Send + Sync + 'static {
    /// Runs one script; the future owns what it needs.
    fn eval(&self, request: &Request<'_>) -> BoxFuture<Reply>;

    /// Whether a reconnect of its connection always fails a request first (so
    /// the monitor suspects the instance): then grants need not check the
    /// server's `run_id`, which costs the server an `INFO` each. True for the
    /// locker's own RESP2 connections; a RESP3 connection manager reconnects at
    /// the disconnect push, and a user's connection may do anything.
    fn sees_reconnects(&self) -> bool {
        false
    }

    /// How long after this locker saw the instance's server change (a
    /// failover) other lockers may still be granting on the old one: a
    /// Sentinel member's old primary takes writes until each locker's next
    /// probe moves it on. The quarantine lasts that much longer.
    fn failover_lag(&self, _probe_every: Duration) -> Duration {
        Duration::ZERO
    }

    /// Where release messages can be heard: `None` for a connection the user
    /// made (we cannot open another one like it).
    fn pubsub(&self) -> Option<PubSubSource> {
        None
    }

    /// What `key` holds and its TTL left (`None`: no expiry), read together
    /// (`GET` and `PTTL` in one `MULTI`); `None` where the key is missing. For
    /// inspection, not for locking.
    fn peek(&self, key: &Arc<str>) -> BoxFuture<Result<Option<Peeked>, ::redis::RedisError>>;

    /// Loads every script, so later calls need no `NOSCRIPT` round trip.
    fn load_scripts(&self) -> BoxFuture<Result<(), ::redis::RedisError>>;

    /// The server's identity, clock and epoch, in one round trip; `candidate`
    /// is written as the epoch hash's id where there is none (`HSETNX`).
    fn probe(
        &self,
        epoch_key: &Arc<str>,
        candidate: &Arc<str>,
    ) -> BoxFuture<Result<Probe, ::redis::RedisError>>;
}
