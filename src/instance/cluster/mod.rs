//! A Redis Cluster as one quorum member (feature `cluster`): each key runs on
//! its slot's primary through redis-rs's cluster client, and the member's
//! defences apply to each primary.
//!
//! - **Keys.** Every key one script touches shares the lock key's slot: the
//!   fencing counter is `{key}:fence` for a key without a hash tag (which hashes
//!   as `key` does) and `key:fence` for one with a tag; the epoch hash is one
//!   per slot, `…quorumlock:epoch:{t}` with `t` a tag of that slot.
//! - **Restarts and failovers.** A grant checks, in its script, the slot's
//!   epoch id and the `run_id` of the primary the last probe saw serving the
//!   slot: a primary that restarted, lost its keys, or was replaced by a
//!   replica refuses. The first grant in a slot writes the slot's epoch hash
//!   and checks the node answering is that primary and still holds its anchor.
//! - **A new locker after a failover.** Each primary's anchor records the
//!   primary's identity and since when: a locker that never saw the old
//!   primary still sits out the rest of the quarantine.
//! - **What the standing sees** (see `view`): one `run_id` for the slot map and
//!   every primary's `run_id`, one epoch for the primaries' data sets; a change
//!   of either quarantines the whole member, as a restart of a server does.
//! - **The longest TTL.** Before a grant or extend, every primary's anchor
//!   that records less gets the TTL; each probe writes the longest it read
//!   onto anchors that came back empty, so that the record outlives any one
//!   primary's restart.
//! - **Clocks.** Each primary's clock is probed and its rate measured; the
//!   member's bound is the fastest's.
//! - **Timeouts.** The cluster client retries a few times, a few milliseconds
//!   apart (MOVED and ASK are followed within the instance timeout); the locker
//!   bounds every call itself.

pub(crate) mod view;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::future::{join_all, try_join_all};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{ErrorKind, RedisError, Value};

use self::view::{Primary, View};
use super::redis::{evalsha, longest_ttl, plain_set, set_reply};
use super::{counted, BoxFuture, Instance, Peeked, Probe, PubSubSource, Reply, Request};
use crate::epoch::{self, Epoch};
use crate::names::FENCE_SUFFIX;
use crate::scripts::{self, Lua};
use crate::slot;

/// A Redis Cluster member.
pub(crate) struct ClusterInstance {
    connection: ClusterConnection,
    /// A client of the first seed node, for the release messages: `PUBLISH`
    /// reaches every node of a cluster.
    seed: redis::Client,
    known: Arc<Mutex<Known>>,
}

/// What the member has learnt since its last probe.
#[derive(Default)]
struct Known {
    view: Option<Arc<View>>,
    /// The epoch id of each slot a grant has verified under `view`.
    slots: HashMap<u16, Arc<str>>,
    /// How many slots a grant found changed: part of the epoch, so that the
    /// next probe quarantines the member.
    changed: u64,
    /// Each slot's epoch hash key, once made.
    keys: HashMap<u16, Arc<str>>,
    /// The longest TTL raised on every anchor since `view` was read: a grant
    /// up to it raises nothing (the view's records are as old as the probe).
    raised_ms: u64,
}

impl Known {
    fn slot_key(&mut self, epoch_key: &str, slot: u16) -> Arc<str> {
        Arc::clone(
            self.keys
                .entry(slot)
                .or_insert_with(|| format!("{epoch_key}:{{{}}}", slot::tag_for(slot)).into()),
        )
    }
}

impl ClusterInstance {
    pub(crate) fn new(connection: ClusterConnection, seed: redis::Client) -> Self {
        Self {
            connection,
            seed,
            known: Arc::default(),
        }
    }
}

fn lock(known: &Mutex<Known>) -> MutexGuard<'_, Known> {
    known.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The fencing counter's key on a cluster: in the lock key's slot.
fn fence_of(key: &str) -> Result<Arc<str>, RedisError> {
    slot::companion(key, FENCE_SUFFIX)
        .map(Arc::from)
        .ok_or_else(|| {
            RedisError::from((
                ErrorKind::Client,
                "key not fit for a cluster",
                format!(
                    "{key} holds a `}}` but no hash tag: its fencing counter cannot share its slot"
                ),
            ))
        })
}

/// Runs a script by `EVALSHA`; a node that answers `NOSCRIPT` (restarted, or
/// new to the cluster) gets the script's source by `EVAL`, which loads it
/// there and follows an `ASK` to the node importing the slot (a `SCRIPT
/// LOAD` routed by the slot map would reach the old owner instead).
async fn call<T: redis::FromRedisValue>(
    connection: &mut ClusterConnection,
    script: &'static Lua,
    command: &redis::Cmd,
) -> Result<T, RedisError> {
    match command.query_async(connection).await {
        Err(err) if err.kind() == ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            let mut eval = redis::cmd("EVAL");
            eval.arg(script.code);
            // After `EVALSHA` and the hash: the key count, keys and arguments.
            for arg in command.args_iter().skip(2) {
                if let redis::Arg::Simple(bytes) = arg {
                    eval.arg(bytes);
                }
            }
            eval.query_async(connection).await
        }
        other => other,
    }
}

/// Runs `request` as it is (its keys already in one slot).
async fn run(connection: &mut ClusterConnection, request: &Request<'_>) -> Reply {
    if let Some(set) = plain_set(request) {
        return set_reply(set.query_async(connection).await?);
    }
    let (script, command) = evalsha(request);
    counted(call(connection, script, &command).await?)
}

/// Raises the longest TTL on every primary's anchor that records less than
/// `ttl_ms`, before a grant or extend that sets it: whichever primary loses
/// its keys later, the others then know how long its locks may last. An anchor
/// that came back empty from a restart is raised at the next such grant (and
/// by the next probe, see [`heal_anchors`]).
async fn raise_anchors(
    connection: &ClusterConnection,
    view: &View,
    ttl_ms: u64,
) -> Result<(), RedisError> {
    let ttl = Duration::from_millis(ttl_ms);
    try_join_all(
        view.primaries
            .iter()
            .filter(|primary| primary.longest_ttl < ttl)
            .map(|primary| raise(connection.clone(), &primary.anchor, ttl_ms)),
    )
    .await
    .map(|_| ())
}

/// Raises one anchor's `ttl` to `ttl_ms` where lower.
async fn raise(
    mut connection: ClusterConnection,
    anchor: &str,
    ttl_ms: u64,
) -> Result<i64, RedisError> {
    let mut raise = redis::cmd("EVALSHA");
    raise
        .arg(scripts::RAISE_TTL.get_hash())
        .arg(1)
        .arg(anchor)
        .arg(ttl_ms);
    call(&mut connection, &scripts::RAISE_TTL, &raise).await
}

/// Records each primary's identity (`run_id` and `master_replid`) in its
/// anchor, with since when (`RECORD_PRIMARY`): a locker that starts after a
/// primary failed over, and never saw the old one, learns how recent the
/// change is. The most recent change any primary records, if any.
async fn record_primaries(
    connection: &ClusterConnection,
    view: &View,
) -> Result<Option<Duration>, RedisError> {
    let records = try_join_all(view.primaries.iter().map(|primary| {
        let mut connection = connection.clone();
        let mut record = redis::cmd("EVALSHA");
        record
            .arg(scripts::RECORD_PRIMARY.get_hash())
            .arg(1)
            .arg(&*primary.anchor)
            .arg(format!("{}:{}", primary.run_id, primary.replication_id));
        async move {
            let mut reply =
                call::<Vec<u64>>(&mut connection, &scripts::RECORD_PRIMARY, &record).await?;
            let now = reply.pop().unwrap_or(0);
            let since = reply.pop().unwrap_or(0);
            Ok::<_, RedisError>(
                (since > 0).then(|| Duration::from_millis(now.saturating_sub(since))),
            )
        }
    }))
    .await?;
    Ok(records.into_iter().flatten().min())
}

/// Writes the longest TTL the probe read onto the anchors that record less
/// (a primary that restarted empty): the record then survives the other
/// primaries' restarts. Best effort: the next probe tries again.
async fn heal_anchors(connection: &ClusterConnection, view: &View, longest: Duration) {
    let ms = u64::try_from(longest.as_millis()).unwrap_or(u64::MAX);
    let behind = view
        .primaries
        .iter()
        .filter(|primary| primary.longest_ttl < longest)
        .map(|primary| raise(connection.clone(), &primary.anchor, ms));
    let _ = join_all(behind).await;
}

/// The first grant in `slot`: writes the slot's epoch hash where missing, and
/// checks that the node holding it is `primary` and still holds its anchor id.
/// In that order: a node that lost its keys before the first step has lost its
/// anchor; one that loses them after it loses the slot's hash, which the grant
/// checks.
async fn verify_slot(
    connection: &mut ClusterConnection,
    slot_key: &str,
    primary: &Primary,
) -> Result<Arc<str>, RedisError> {
    let candidate = Epoch::generate()?;
    let mut learn = redis::cmd("EVALSHA");
    learn
        .arg(scripts::SLOT_EPOCH.get_hash())
        .arg(1)
        .arg(slot_key)
        .arg(&*candidate);
    let (id, run_id): (Option<String>, Option<String>) =
        call(connection, &scripts::SLOT_EPOCH, &learn).await?;
    if run_id.as_deref() != Some(&*primary.run_id) {
        return Err(epoch::changed());
    }
    let mut anchor = redis::cmd("HGET");
    anchor.arg(&*primary.anchor).arg("id");
    let held = connection
        .route_command(
            anchor,
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                host: primary.host.clone(),
                port: primary.port,
            }),
        )
        .await?;
    let held: Option<String> = redis::from_redis_value(held).map_err(RedisError::from)?;
    if held.as_deref() != Some(&*primary.anchor_id) {
        return Err(epoch::changed());
    }
    id.filter(|id| !id.is_empty())
        .map(Arc::from)
        .ok_or_else(|| view::unexpected("the slot's epoch hash holds no id"))
}

impl ClusterInstance {
    /// A grant checked against the member's identity: see the module's
    /// documentation.
    fn checked_grant(&self, request: &Request<'_>, checked: &Epoch) -> BoxFuture<Reply> {
        let Request::Grant {
            key,
            value,
            ttl_ms,
            retake,
            fence,
            ..
        } = *request
        else {
            unreachable!("only grants are checked");
        };
        let mut connection = self.connection.clone();
        let known = Arc::clone(&self.known);
        let (key, value, retake) = (Arc::clone(key), Arc::clone(value), retake.cloned());
        let fence = fence.map(|_| fence_of(&key));
        let checked = checked.clone();
        Box::pin(async move {
            let fence = fence.transpose()?;
            let slot = slot::key_slot(key.as_bytes());
            let (view, slot_key, verified, raised_ms) = {
                let mut known = lock(&known);
                let view = known.view.clone().filter(|view| {
                    view.epoch == checked.id
                        && checked
                            .run_id
                            .as_ref()
                            .is_none_or(|run| *run == view.run_id)
                });
                let Some(view) = view else {
                    return Err(epoch::changed());
                };
                let slot_key = known.slot_key(&checked.key, slot);
                let verified = known.slots.get(&slot).cloned();
                (view, slot_key, verified, known.raised_ms)
            };
            let Some(primary) = view.primary_of(slot).cloned() else {
                // No primary served the slot at the last probe.
                return Err(epoch::changed());
            };
            let id = match verified {
                Some(id) => id,
                None => {
                    let id = verify_slot(&mut connection, &slot_key, &primary).await?;
                    let mut known = lock(&known);
                    if known
                        .view
                        .as_ref()
                        .is_some_and(|now| Arc::ptr_eq(now, &view))
                    {
                        known.slots.insert(slot, Arc::clone(&id));
                    }
                    id
                }
            };
            // Every anchor, not only where `checked.raise` says the member's
            // longest is below: one primary's may lag the others'.
            if ttl_ms > raised_ms {
                raise_anchors(&connection, &view, ttl_ms).await?;
                let mut known = lock(&known);
                if known
                    .view
                    .as_ref()
                    .is_some_and(|now| Arc::ptr_eq(now, &view))
                {
                    known.raised_ms = known.raised_ms.max(ttl_ms);
                }
            }
            let epoch = Epoch {
                key: slot_key,
                id,
                run_id: Some(Arc::clone(&primary.run_id)),
                raise: false,
            };
            let grant = Request::Grant {
                key: &key,
                value: &value,
                ttl_ms,
                retake: retake.as_ref(),
                fence: fence.as_ref(),
                epoch: Some(&epoch),
            };
            let reply = run(&mut connection, &grant).await;
            if reply.as_ref().is_err_and(epoch::is_changed) {
                let mut known = lock(&known);
                known.slots.remove(&slot);
                known.changed += 1;
            }
            reply
        })
    }
}

impl Instance for ClusterInstance {
    fn eval(&self, request: &Request<'_>) -> BoxFuture<Reply> {
        let mut connection = self.connection.clone();
        match *request {
            Request::Grant {
                epoch: Some(checked),
                ..
            } => self.checked_grant(request, checked),
            Request::Grant {
                key,
                value,
                ttl_ms,
                retake,
                fence,
                epoch: None,
            } => {
                let fence = fence.map(|_| fence_of(key));
                let (key, value, retake) = (Arc::clone(key), Arc::clone(value), retake.cloned());
                Box::pin(async move {
                    let fence = fence.transpose()?;
                    let grant = Request::Grant {
                        key: &key,
                        value: &value,
                        ttl_ms,
                        retake: retake.as_ref(),
                        fence: fence.as_ref(),
                        epoch: None,
                    };
                    run(&mut connection, &grant).await
                })
            }
            Request::Extend {
                key,
                value,
                ttl_ms,
                epoch_key,
            } => {
                // Raised as a grant raises them, whatever `epoch_key` says.
                let view = lock(&self.known).view.clone();
                let _ = epoch_key;
                let (key, value) = (Arc::clone(key), Arc::clone(value));
                Box::pin(async move {
                    if let Some(view) = view {
                        raise_anchors(&connection, &view, ttl_ms).await?;
                    }
                    let extend = Request::Extend {
                        key: &key,
                        value: &value,
                        ttl_ms,
                        epoch_key: None,
                    };
                    run(&mut connection, &extend).await
                })
            }
            Request::Release { .. } => {
                let (script, command) = evalsha(request);
                Box::pin(async move { counted(call(&mut connection, script, &command).await?) })
            }
            Request::FenceWriteBack {
                key, value, token, ..
            } => {
                let fence = fence_of(key);
                let (key, value) = (Arc::clone(key), Arc::clone(value));
                Box::pin(async move {
                    let fence = fence?;
                    let write = Request::FenceWriteBack {
                        key: &key,
                        fence: &fence,
                        value: &value,
                        token,
                    };
                    run(&mut connection, &write).await
                })
            }
        }
    }

    fn pubsub(&self) -> Option<PubSubSource> {
        Some(PubSubSource::Redis(Box::new(self.seed.clone())))
    }

    fn peek(&self, key: &Arc<str>) -> BoxFuture<Result<Option<Peeked>, RedisError>> {
        let mut connection = self.connection.clone();
        let mut read = redis::cmd("EVAL");
        read.arg(r#"return {redis.call("GET", KEYS[1]), redis.call("PTTL", KEYS[1])}"#)
            .arg(1)
            .arg(&**key);
        Box::pin(async move {
            let (value, pttl): (Option<Vec<u8>>, i64) = read.query_async(&mut connection).await?;
            Ok(value.map(|value| Peeked {
                value: String::from_utf8_lossy(&value).into_owned(),
                ttl: u64::try_from(pttl).ok().map(Duration::from_millis),
            }))
        })
    }

    fn load_scripts(&self) -> BoxFuture<Result<(), RedisError>> {
        let scripts = scripts::all().into_iter().chain([
            &scripts::SLOT_EPOCH,
            &scripts::RAISE_TTL,
            &scripts::RECORD_PRIMARY,
        ]);
        let loads: Vec<_> = scripts
            .map(|script| {
                let mut connection = self.connection.clone();
                let mut load = redis::cmd("SCRIPT");
                load.arg("LOAD").arg(script.code);
                async move { load.query_async::<Value>(&mut connection).await }
            })
            .collect();
        Box::pin(async move {
            // To every node (replicas too: one may be promoted).
            try_join_all(loads).await.map(|_| ())
        })
    }

    fn probe(
        &self,
        epoch_key: &Arc<str>,
        candidate: &Arc<str>,
    ) -> BoxFuture<Result<Probe, RedisError>> {
        let connection = self.connection.clone();
        let known = Arc::clone(&self.known);
        let (epoch_key, candidate) = (Arc::clone(epoch_key), Arc::clone(candidate));
        Box::pin(async move { probe(connection, &known, &epoch_key, &candidate).await })
    }
}

/// One probe of the cluster: its slot map, then each primary's identity,
/// clock and anchor, in one round trip per primary.
async fn probe(
    mut connection: ClusterConnection,
    known: &Mutex<Known>,
    epoch_key: &str,
    candidate: &str,
) -> Result<Probe, RedisError> {
    let mut slots = redis::cmd("CLUSTER");
    slots.arg("SLOTS");
    let reply = connection
        .route_command(
            slots,
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        )
        .await?;
    let (ranges, addresses) = view::parse_slots(reply)?;
    let anchors: Vec<Arc<str>> = {
        let mut known = lock(known);
        addresses
            .iter()
            .map(|(_, first)| known.slot_key(epoch_key, *first))
            .collect()
    };
    let answers = join_all(
        addresses
            .iter()
            .zip(&anchors)
            .map(|((address, _), anchor)| {
                let mut connection = connection.clone();
                let mut pipe = redis::pipe();
                pipe.cmd("INFO")
                    .arg("server")
                    .cmd("INFO")
                    .arg("replication")
                    .cmd("TIME")
                    .cmd("HSETNX")
                    .arg(&**anchor)
                    .arg("id")
                    .arg(candidate)
                    .cmd("HMGET")
                    .arg(&**anchor)
                    .arg("id")
                    .arg("ttl");
                let route = SingleNodeRoutingInfo::ByAddress {
                    host: address.host.clone(),
                    port: address.port,
                };
                async move { connection.route_pipeline(pipe, 0, 5, route).await }
            }),
    )
    .await;
    let mut primaries = Vec::with_capacity(addresses.len());
    let mut clocks = Vec::with_capacity(addresses.len());
    let mut longest = Duration::ZERO;
    for (((address, _), anchor), answer) in addresses.into_iter().zip(anchors).zip(answers) {
        let answer = view::parse_answer(answer?)?;
        let recorded = longest_ttl(answer.longest_ttl_ms.as_deref());
        longest = longest.max(recorded);
        clocks.push((Arc::clone(&answer.run_id), answer.server_time));
        primaries.push(Primary {
            host: address.host,
            port: address.port,
            run_id: answer.run_id,
            replication_id: answer.replication_id,
            anchor,
            anchor_id: answer.anchor_id,
            longest_ttl: recorded,
        });
    }
    let view = {
        let mut known = lock(known);
        let view = Arc::new(View::new(ranges, primaries, known.changed));
        let same = known
            .view
            .as_ref()
            .is_some_and(|old| old.run_id == view.run_id && old.epoch == view.epoch);
        if !same {
            // Verified under another slot map or data set: verified again.
            known.slots.clear();
        }
        known.view = Some(Arc::clone(&view));
        known.raised_ms = 0;
        view
    };
    heal_anchors(&connection, &view, longest).await;
    let changed_ago = record_primaries(&connection, &view).await?;
    let mut clocks = clocks.into_iter();
    let (_, server_time) = clocks
        .next()
        .ok_or_else(|| view::unexpected("CLUSTER SLOTS names no primary"))?;
    Ok(Probe {
        run_id: view.run_id.to_string(),
        server_time,
        other_clocks: clocks.collect(),
        changed_ago,
        epoch: Arc::clone(&view.epoch),
        longest_ttl: longest,
    })
}
