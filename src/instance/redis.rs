//! A Redis server reached through any cloneable async redis-rs connection
//! (`MultiplexedConnection`, `ConnectionManager`, or the user's own).

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{ErrorKind, RedisError, Script, Value};

use super::{BoxFuture, Counter, Instance, Probe, PubSubSource, Reply};
use crate::epoch::{self, Epoch};
use crate::peer::Peer;
use crate::scripts;

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
    match (result, peer) {
        (Ok(value), Some(peer)) => {
            peer.answered();
            Ok(value)
        }
        (Err(err), Some(peer)) => Err(peer.explain(err).await),
        (result, None) => result,
    }
}

impl<C> RedisInstance<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Runs a script that answers 1 (done) or 0 (refused), or -1 (the epoch
    /// differs).
    fn run(&self, script: &'static Script, keys: &[&str], args: &[&str]) -> BoxFuture<Reply> {
        self.run_cmd(script, evalsha(script, keys, args))
    }

    /// Runs a built `EVALSHA` of `script` that answers 1, 0 or -1 (see `run`);
    /// one box per call, on the hot path of every grant and release.
    fn run_cmd(&self, script: &'static Script, evalsha: redis::Cmd) -> BoxFuture<Reply> {
        let mut connection = self.connection.clone();
        let peer = self.peer.clone();
        Box::pin(async move {
            let answer = explained(peer, call(script, &evalsha, &mut connection).await).await?;
            Ok(count(answer)? == 1)
        })
    }

    /// Runs a script over `keys` that answers a non-negative integer, or -1 (the
    /// epoch differs).
    fn run_counter(
        &self,
        script: &'static Script,
        keys: &[&str],
        args: &[&str],
    ) -> BoxFuture<Counter> {
        let mut connection = self.connection.clone();
        let evalsha = evalsha(script, keys, args);
        let peer = self.peer.clone();
        Box::pin(async move {
            count(explained(peer, call(script, &evalsha, &mut connection).await).await?)
        })
    }
}

/// A script's answer: a count, or -1 where the server is not the one verified.
fn count(answer: i64) -> Result<u64, RedisError> {
    match answer {
        -1 => Err(epoch::changed()),
        answer => u64::try_from(answer).map_err(|_| unexpected("a script", &Value::Int(answer))),
    }
}

/// The keys and last three arguments a granting script takes for `epoch`:
/// the epoch hash after `keys`, its id, the `run_id` and the raise flag (empty
/// for none).
fn with_epoch<'a>(keys: &[&'a str], epoch: Option<&'a Epoch>) -> (Vec<&'a str>, [&'a str; 3]) {
    let mut all = keys.to_vec();
    match epoch {
        Some(epoch) => {
            all.push(&epoch.key);
            (all, [&epoch.value, run_id(epoch), raise(epoch)])
        }
        None => (all, ["", "", ""]),
    }
}

fn run_id(epoch: &Epoch) -> &str {
    epoch.run_id.as_deref().unwrap_or("")
}

fn raise(epoch: &Epoch) -> &'static str {
    if epoch.raise {
        "1"
    } else {
        ""
    }
}

/// `EVALSHA` for `script`, built directly: the hot path of every release, extend
/// and re-take, where redis-rs's script invocation would copy every argument
/// once more.
fn evalsha(script: &Script, keys: &[&str], args: &[&str]) -> redis::Cmd {
    // Sized up front: growing the argument buffers was a tenth of a cycle's work.
    let count = 3 + keys.len() + args.len();
    let bytes = 64
        + keys
            .iter()
            .chain(args)
            .map(|part| part.len())
            .sum::<usize>();
    let mut cmd = redis::Cmd::with_capacity(count, bytes);
    cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys.len());
    for key in keys {
        cmd.arg(*key);
    }
    for arg in args {
        cmd.arg(*arg);
    }
    cmd
}

/// Runs `evalsha`; after a restart or `SCRIPT FLUSH` the server answers
/// `NOSCRIPT`, and the script is loaded and the call repeated once.
async fn call<C: ConnectionLike>(
    script: &'static Script,
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
    fn set_nx_px(
        &self,
        key: &Arc<str>,
        value: &Arc<str>,
        ttl_ms: u64,
        epoch: Option<&Epoch>,
    ) -> BoxFuture<Reply> {
        if let Some(epoch) = epoch {
            // Built here rather than by `evalsha`: the TTL goes in as a number,
            // with no string of its own.
            let script = &*scripts::SET_CHECKED;
            let bytes = 96 + key.len() + epoch.key.len() + value.len() + epoch.value.len();
            let mut cmd = redis::Cmd::with_capacity(10, bytes + run_id(epoch).len());
            cmd.arg("EVALSHA")
                .arg(script.get_hash())
                .arg(2)
                .arg(&**key)
                .arg(&*epoch.key)
                .arg(&**value)
                .arg(ttl_ms)
                .arg(&*epoch.value)
                .arg(run_id(epoch))
                .arg(raise(epoch));
            return self.run_cmd(script, cmd);
        }
        let mut connection = self.connection.clone();
        let mut set = redis::Cmd::with_capacity(6, 32 + key.len() + value.len());
        set.arg("SET")
            .arg(&**key)
            .arg(&**value)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms);
        let peer = self.peer.clone();
        Box::pin(async move {
            match explained(peer, set.query_async::<Value>(&mut connection).await).await? {
                Value::Okay => Ok(true),
                Value::SimpleString(ok) if ok == "OK" => Ok(true),
                Value::Nil => Ok(false),
                other => Err(unexpected("SET NX PX", &other)),
            }
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
        let ttl_ms = ttl_ms.to_string();
        let (keys, [id, run_id, raise]) = with_epoch(&[key], epoch);
        self.run(
            &scripts::RETAKE,
            &keys,
            &[value, &ttl_ms, token, id, run_id, raise],
        )
    }

    fn extend(
        &self,
        key: &Arc<str>,
        value: &Arc<str>,
        ttl_ms: u64,
        epoch_key: Option<&Arc<str>>,
    ) -> BoxFuture<Reply> {
        let ttl_ms = ttl_ms.to_string();
        match epoch_key {
            Some(epoch_key) => {
                self.run(&scripts::EXTEND, &[key, epoch_key], &[value, &ttl_ms, "1"])
            }
            None => self.run(&scripts::EXTEND, &[key], &[value, &ttl_ms, ""]),
        }
    }

    fn release(&self, key: &Arc<str>, value: &Arc<str>) -> BoxFuture<Reply> {
        self.run(&scripts::RELEASE, &[key], &[value])
    }

    fn fenced_set(
        &self,
        key: &Arc<str>,
        fence: &Arc<str>,
        value: &Arc<str>,
        ttl_ms: u64,
        epoch: Option<&Epoch>,
    ) -> BoxFuture<Counter> {
        let ttl_ms = ttl_ms.to_string();
        let (keys, [id, run_id, raise]) = with_epoch(&[key, fence], epoch);
        self.run_counter(
            &scripts::FENCED_SET,
            &keys,
            &[value, &ttl_ms, id, run_id, raise],
        )
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
        let ttl_ms = ttl_ms.to_string();
        let (keys, [id, run_id, raise]) = with_epoch(&[key, fence], epoch);
        self.run_counter(
            &scripts::FENCED_RETAKE,
            &keys,
            &[value, &ttl_ms, token, id, run_id, raise],
        )
    }

    fn fence_write_back(
        &self,
        key: &Arc<str>,
        fence: &Arc<str>,
        value: &Arc<str>,
        token: u64,
    ) -> BoxFuture<Reply> {
        let token = token.to_string();
        let written = self.run_counter(&scripts::FENCE_WRITE_BACK, &[key, fence], &[value, &token]);
        Box::pin(async move { Ok(written.await? == 1) })
    }

    fn release_publish(
        &self,
        key: &Arc<str>,
        value: &Arc<str>,
        channel: &Arc<str>,
        message: &Arc<str>,
    ) -> BoxFuture<Reply> {
        self.run(
            &scripts::RELEASE_PUBLISH,
            &[key],
            &[value, channel, message],
        )
    }

    fn sees_reconnects(&self) -> bool {
        self.sees_reconnects
    }

    fn pubsub(&self) -> Option<PubSubSource> {
        self.client
            .clone()
            .map(|client| PubSubSource::Redis(Box::new(client)))
    }

    fn load_scripts(&self) -> BoxFuture<Reply> {
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
            explained(peer, loaded).await.map(|_| true)
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
            let run_id = info
                .lines()
                .find_map(|line| line.strip_prefix("run_id:"))
                .map(|id| id.trim().to_string())
                .ok_or_else(|| {
                    RedisError::from((
                        ErrorKind::UnexpectedReturnType,
                        "unexpected reply",
                        "INFO server has no run_id".to_string(),
                    ))
                })?;
            Ok(Probe {
                run_id,
                server_time: Duration::from_secs(seconds) + Duration::from_micros(micros),
                epoch: epoch.into(),
                longest_ttl: longest_ttl(longest_ms.as_deref()),
            })
        })
    }
}

/// The epoch hash's `ttl` field: milliseconds, or missing. Anything else (an
/// operator's edit) is taken as the longest TTL there can be: a quarantine too
/// long only costs availability, one too short costs exclusion.
fn longest_ttl(field: Option<&str>) -> Duration {
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
