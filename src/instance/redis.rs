//! A Redis server reached through any cloneable async redis-rs connection
//! (`MultiplexedConnection`, `ConnectionManager`, or the user's own).

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{ErrorKind, RedisError, Value};

use super::{
    counted, info_field, BoxFuture, Instance, Peeked, Probe, PubSubSource, Reply, Request,
};
use crate::peer::Peer;
use crate::scripts::{self, Lua};

/// A Redis instance over connection `C`; every operation clones `C`, which for
/// multiplexed connections shares one socket.
pub(crate) struct RedisInstance<C> {
    connection: C,
    /// For URL instances: the client that opens subscription connections.
    client: Option<redis::Client>,
    /// For URL instances over TCP: the address, to explain failures with.
    peer: Option<Arc<Peer>>,
    /// See [`Instance::sees_reconnects`]: our own RESP2 connections.
    sees_reconnects: bool,
}

impl<C> RedisInstance<C> {
    pub(crate) fn new(connection: C) -> Self {
        Self {
            connection,
            sees_reconnects: false,
            client: None,
            peer: None,
        }
    }

    /// An instance that can also open a subscription connection from `client`,
    /// and whose failures `peer` explains.
    pub(crate) fn with_client(
        connection: C,
        client: redis::Client,
        peer: Option<Arc<Peer>>,
        sees_reconnects: bool,
    ) -> Self {
        Self {
            connection,
            client: Some(client),
            peer,
            sees_reconnects,
        }
    }
}

/// `result` as the caller sees it: an error explained by the peer, where known.
async fn explained<T>(
    peer: Option<Arc<Peer>>,
    result: Result<T, RedisError>,
) -> Result<T, RedisError> {
    match (result.map_err(cluster_node), peer) {
        (Ok(value), Some(peer)) => {
            peer.answered();
            Ok(value)
        }
        (Err(err), Some(peer)) => Err(peer.explain(err).await),
        (result, None) => result,
    }
}

/// A server that redirects keys (`MOVED`, `ASK`) or says the cluster is down
/// is a Redis Cluster node given as a single server: said so, rather than as
/// redis-rs's redirection.
fn cluster_node(err: RedisError) -> RedisError {
    use redis::ServerErrorKind::{Ask, ClusterDown, Moved};
    let redirected = matches!(err.kind(), ErrorKind::Server(Moved | Ask | ClusterDown))
        || err.to_string().contains("Moved:");
    if !redirected {
        return err;
    }
    RedisError::from((
        ErrorKind::Client,
        "a Redis Cluster node",
        format!(
            "this server is a node of a Redis Cluster ({err}): add the cluster with Builder::cluster (qlock --cluster), not as a single server"
        ),
    ))
}

/// An argument of a script call: text, or a number written without a string
/// of its own.
#[derive(Clone, Copy)]
enum Arg<'a> {
    Str(&'a str),
    Int(u64),
}

impl Arg<'_> {
    fn len(self) -> usize {
        match self {
            Arg::Str(text) => text.len(),
            Arg::Int(_) => 20,
        }
    }
}

/// The script a request runs and its `EVALSHA`: the one place the KEYS and
/// ARGV each script reads (see `scripts`) are laid out.
pub(super) fn evalsha(request: &Request<'_>) -> (&'static Lua, redis::Cmd) {
    // At most three keys and six arguments; arrays rather than vectors, on the
    // hot path of every grant and release.
    let mut keys = [""; 3];
    let mut args = [Arg::Str(""); 6];
    let (script, nkeys, nargs): (&'static Lua, usize, usize) = match *request {
        Request::Grant {
            key,
            value,
            ttl_ms,
            retake,
            fence,
            epoch,
        } => {
            let script = match (retake.is_some(), fence.is_some()) {
                (false, false) => &scripts::SET_CHECKED,
                (true, false) => &scripts::RETAKE,
                (false, true) => &scripts::FENCED_SET,
                (true, true) => &scripts::FENCED_RETAKE,
            };
            let mut nkeys = 0;
            for name in [Some(&**key), fence.map(|f| &**f), epoch.map(|e| &*e.key)]
                .into_iter()
                .flatten()
            {
                keys[nkeys] = name;
                nkeys += 1;
            }
            let mut nargs = 0;
            let mut push = |arg| {
                args[nargs] = arg;
                nargs += 1;
            };
            push(Arg::Str(value));
            push(Arg::Int(ttl_ms));
            if let Some(token) = retake {
                push(Arg::Str(token));
            }
            // Empty for no check: the script then checks nothing.
            push(Arg::Str(epoch.map_or("", |e| &*e.id)));
            push(Arg::Str(
                epoch.and_then(|e| e.run_id.as_deref()).unwrap_or(""),
            ));
            push(Arg::Str(if epoch.is_some_and(|e| e.raise) {
                "1"
            } else {
                ""
            }));
            (script, nkeys, nargs)
        }
        Request::Extend {
            key,
            value,
            ttl_ms,
            epoch_key,
        } => {
            keys[0] = key;
            let nkeys = match epoch_key {
                Some(epoch_key) => {
                    keys[1] = epoch_key;
                    2
                }
                None => 1,
            };
            args[..3].copy_from_slice(&[
                Arg::Str(value),
                Arg::Int(ttl_ms),
                Arg::Str(if epoch_key.is_some() { "1" } else { "" }),
            ]);
            (&scripts::EXTEND, nkeys, 3)
        }
        Request::Release {
            key,
            value,
            publish: None,
        } => {
            keys[0] = key;
            args[0] = Arg::Str(value);
            (&scripts::RELEASE, 1, 1)
        }
        Request::Release {
            key,
            value,
            publish: Some((channel, message)),
        } => {
            keys[0] = key;
            args[..3].copy_from_slice(&[Arg::Str(value), Arg::Str(channel), Arg::Str(message)]);
            (&scripts::RELEASE_PUBLISH, 1, 3)
        }
        Request::FenceWriteBack {
            key,
            fence,
            value,
            token,
        } => {
            keys[..2].copy_from_slice(&[key, fence]);
            args[..2].copy_from_slice(&[Arg::Str(value), Arg::Int(token)]);
            (&scripts::FENCE_WRITE_BACK, 2, 2)
        }
    };
    let (keys, args) = (&keys[..nkeys], &args[..nargs]);
    // Sized up front: growing the argument buffers was a tenth of a cycle's work.
    let bytes = 64
        + keys.iter().map(|key| key.len()).sum::<usize>()
        + args.iter().map(|arg| arg.len()).sum::<usize>();
    let mut cmd = redis::Cmd::with_capacity(3 + keys.len() + args.len(), bytes);
    cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys.len());
    for key in keys {
        cmd.arg(*key);
    }
    for arg in args {
        match *arg {
            Arg::Str(text) => cmd.arg(text),
            Arg::Int(number) => cmd.arg(number),
        };
    }
    (script, cmd)
}

/// A grant with nothing to check is a plain `SET NX PX`: no script to run.
pub(super) fn plain_set(request: &Request<'_>) -> Option<redis::Cmd> {
    let Request::Grant {
        key,
        value,
        ttl_ms,
        retake: None,
        fence: None,
        epoch: None,
    } = *request
    else {
        return None;
    };
    let mut set = redis::Cmd::with_capacity(6, 32 + key.len() + value.len());
    set.arg("SET")
        .arg(&**key)
        .arg(&**value)
        .arg("NX")
        .arg("PX")
        .arg(ttl_ms);
    Some(set)
}

/// [`plain_set`]'s answer as a [`Reply`].
pub(super) fn set_reply(reply: Value) -> Reply {
    match reply {
        Value::Okay => Ok(1),
        Value::SimpleString(ok) if ok == "OK" => Ok(1),
        Value::Nil => Ok(0),
        other => Err(unexpected("SET NX PX", &other)),
    }
}

/// Runs `evalsha`; after a restart or `SCRIPT FLUSH` the server answers
/// `NOSCRIPT`, and the script is loaded and the call repeated once.
async fn call<C: ConnectionLike>(
    script: &'static Lua,
    evalsha: &redis::Cmd,
    connection: &mut C,
) -> Result<i64, RedisError> {
    match evalsha.query_async(connection).await {
        Err(err) if err.kind() == ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.prepare_invoke().load_async(connection).await?;
            evalsha.query_async(connection).await
        }
        other => other,
    }
}

impl<C> Instance for RedisInstance<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn eval(&self, request: &Request<'_>) -> BoxFuture<Reply> {
        let mut connection = self.connection.clone();
        let peer = self.peer.clone();
        if let Some(set) = plain_set(request) {
            return Box::pin(async move {
                set_reply(explained(peer, set.query_async::<Value>(&mut connection).await).await?)
            });
        }
        let (script, evalsha) = evalsha(request);
        // One box per call, on the hot path of every grant and release.
        Box::pin(async move {
            counted(explained(peer, call(script, &evalsha, &mut connection).await).await?)
        })
    }

    fn sees_reconnects(&self) -> bool {
        self.sees_reconnects
    }

    fn pubsub(&self) -> Option<PubSubSource> {
        self.client
            .clone()
            .map(|client| PubSubSource::Redis(Box::new(client)))
    }

    fn peek(&self, key: &Arc<str>) -> BoxFuture<Result<Option<Peeked>, RedisError>> {
        let mut connection = self.connection.clone();
        let mut read = redis::pipe();
        read.atomic().cmd("GET").arg(&**key).cmd("PTTL").arg(&**key);
        let peer = self.peer.clone();
        Box::pin(async move {
            let (value, pttl): (Option<Vec<u8>>, i64) =
                explained(peer, read.query_async(&mut connection).await).await?;
            Ok(value.map(|value| Peeked {
                value: String::from_utf8_lossy(&value).into_owned(),
                ttl: u64::try_from(pttl).ok().map(Duration::from_millis),
            }))
        })
    }

    fn load_scripts(&self) -> BoxFuture<Result<(), RedisError>> {
        let loads = scripts::all().map(|script| {
            let mut connection = self.connection.clone();
            async move { script.prepare_invoke().load_async(&mut connection).await }
        });
        let peer = self.peer.clone();
        Box::pin(async move {
            // Sent together over the multiplexed connection: one round trip.
            let loaded: Result<Vec<_>, _> = futures_util::future::join_all(loads)
                .await
                .into_iter()
                .collect();
            explained(peer, loaded).await.map(|_| ())
        })
    }

    fn probe(
        &self,
        epoch_key: &Arc<str>,
        candidate: &Arc<str>,
    ) -> BoxFuture<Result<Probe, RedisError>> {
        let mut connection = self.connection.clone();
        let mut probe = redis::pipe();
        probe
            .cmd("INFO")
            .arg("server")
            .cmd("TIME")
            .cmd("HSETNX")
            .arg(&**epoch_key)
            .arg("id")
            .arg(&**candidate)
            .ignore()
            .cmd("HMGET")
            .arg(&**epoch_key)
            .arg("id")
            .arg("ttl");
        let peer = self.peer.clone();
        Box::pin(async move {
            type Answer = (String, (u64, u64), (Option<String>, Option<String>));
            let (info, (seconds, micros), (epoch, longest_ms)): Answer =
                explained(peer, probe.query_async(&mut connection).await).await?;
            // An id an operator emptied would turn the grants' check off.
            let epoch = epoch.filter(|id| !id.is_empty()).ok_or_else(|| {
                RedisError::from((
                    ErrorKind::UnexpectedReturnType,
                    "unexpected reply",
                    "the epoch hash holds no id".to_string(),
                ))
            })?;
            let run_id = info_field(&info, "server", "run_id")?.to_string();
            Ok(Probe {
                run_id,
                server_time: Duration::from_secs(seconds) + Duration::from_micros(micros),
                other_clocks: Vec::new(),
                changed_ago: None,
                epoch: epoch.into(),
                longest_ttl: longest_ttl(longest_ms.as_deref()),
            })
        })
    }
}

/// The epoch hash's `ttl` field: milliseconds, or missing. Anything else (an
/// operator's edit) is taken as the longest TTL there can be: a quarantine too
/// long only costs availability, one too short costs exclusion.
pub(super) fn longest_ttl(field: Option<&str>) -> Duration {
    match field.map(str::parse::<u64>) {
        None => Duration::ZERO,
        Some(Ok(ms)) => Duration::from_millis(ms).min(crate::MAX_TTL),
        Some(Err(_)) => {
            tracing::warn!(
                field,
                "the epoch hash's ttl is not a number of milliseconds: taken as the longest TTL"
            );
            crate::MAX_TTL
        }
    }
}

fn unexpected(command: &str, reply: &Value) -> RedisError {
    RedisError::from((
        ErrorKind::UnexpectedReturnType,
        "unexpected reply",
        format!("{command} answered {reply:?}"),
    ))
}
