//! A real Redis Cluster on loopback ports: primaries that split the 16384 hash slots,
//! optionally a replica each, joined by `redis-cli --cluster create`.
//!
//! Where [`RedisCluster`](super::RedisCluster) is N independent servers (the N
//! instances of a Redlock deployment), this is one sharded deployment, for tests of
//! a Redis Cluster as a quorum member: routing by slot, `MOVED` after a failover, a
//! primary lost with or without a replica to replace it.
//!
//! Here, the fixture and its controls; in `create`, the join; in `topology`, what the
//! nodes say and the check that they agree; in `slot`, the hash slot of a key.

mod create;
mod migrate;

mod topology;

use std::time::{Duration, Instant};

use tempfile::TempDir;

use self::topology::{check_healthy, View};
use super::probe::{query, wait_for};
use super::server::{RedisServer, RedisServerBuilder};
use super::{HarnessError, RedisCluster};

const FIXTURE: &str = "ShardedCluster";
/// From `redis-cli --cluster create` to every node agreeing: about a second on an
/// idle machine; the margin is for a loaded one.
const FORM_TIMEOUT: Duration = Duration::from_secs(30);
/// For [`ShardedCluster::failover`] as a whole.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// A forced failover that has not happened by then failed (Redis gives a manual
/// failover 5 s), and is asked for again.
const FAILOVER_ATTEMPT: Duration = Duration::from_secs(6);

/// A Redis Cluster of `redis-server` processes on `127.0.0.1`, each on a free port
/// with a free cluster bus port; all are killed when it is dropped.
///
/// Nodes are indexed `0..len()`, in the order they were handed to redis-cli: the
/// first `primaries` start as primaries, the others as their replicas; which is
/// which later, after failovers, is what [`primaries`](Self::primaries) and
/// [`replicas`](Self::replicas) ask the nodes. Methods taking an index panic if it
/// is out of range, as slice indexing does.
///
/// Each node runs with the [`RedisServer`] defaults (no persistence), plus
/// `--cluster-node-timeout 1000` ([`NODE_TIMEOUT`](Self::NODE_TIMEOUT)),
/// `--cluster-replica-validity-factor 0` (a replica may always replace its primary)
/// and `--repl-diskless-sync-delay 0` (replicas sync at once). Its cluster
/// configuration, `nodes-<port>.conf`, is in a directory of the fixture's, so
/// [`node_mut(i)`](Self::node_mut)`.kill()` then `.restart_empty()` brings back the
/// same node, without its keys, and it rejoins; [`wait_until_ok`](Self::wait_until_ok)
/// waits for that.
///
/// The fixture's checks speak no `AUTH`: leave `--requirepass` out of
/// [`start_with`](Self::start_with)'s builder. It needs a local `redis-server` and
/// `redis-cli` (`$REDIS_CLI_BIN`, else the one beside redis-server, else from
/// `PATH`), not the Docker fallback.
#[derive(Debug)]
pub struct ShardedCluster {
    nodes: Vec<RedisServer>,
    /// The nodes' `nodes-<port>.conf`; dropped after them (fields drop in order).
    _config_dir: TempDir,
}

impl ShardedCluster {
    /// The nodes' `cluster-node-timeout`: how long a node may not answer before the
    /// others count it as failing, and its replica, if any, replaces it.
    pub const NODE_TIMEOUT: Duration = Duration::from_millis(1000);

    /// Starts `primaries` primaries (at least 3, as redis-cli requires) with
    /// `replicas_per_primary` replicas each (0 or 1), joins them and waits until
    /// every node says `cluster_state:ok`, every slot is served and, with replicas,
    /// every replica has synced; see [`wait_until_ok`](Self::wait_until_ok).
    ///
    /// # Errors
    ///
    /// [`HarnessError::InvalidRequest`] for fewer than 3 primaries or more than one
    /// replica each; [`HarnessError::Tool`] when `redis-cli --cluster create` fails,
    /// with its output; [`HarnessError::Timeout`] when the cluster does not form in
    /// 30 s, naming what the last check found missing (a node's `cluster_state:fail`,
    /// slots no node serves, a replica not synced); otherwise as for
    /// [`RedisServer::start`].
    pub fn start(primaries: usize, replicas_per_primary: usize) -> Result<Self, HarnessError> {
        Self::start_with(
            primaries,
            replicas_per_primary,
            &RedisServerBuilder::default(),
        )
    }

    /// As [`start`](Self::start), with every node started from `builder`'s settings:
    /// extra arguments (after the fixture's, so `.args(["--cluster-node-timeout",
    /// "5000"])` overrides its node timeout), environment, or the clock shim
    /// ([`RedisServerBuilder::clock_rate`]), which then runs on every node.
    pub fn start_with(
        primaries: usize,
        replicas_per_primary: usize,
        builder: &RedisServerBuilder,
    ) -> Result<Self, HarnessError> {
        if primaries < 3 {
            return Err(invalid(format!(
                "a Redis Cluster needs at least 3 primaries, as redis-cli requires; \
                 {primaries} asked for"
            )));
        }
        if replicas_per_primary > 1 {
            return Err(invalid(format!(
                "at most 1 replica per primary; {replicas_per_primary} asked for"
            )));
        }
        let config_dir = tempfile::Builder::new()
            .prefix("quorumlock-cluster-")
            .tempdir()?;
        let node_timeout = Self::NODE_TIMEOUT.as_millis().to_string();
        let node = builder.clone().cluster_node(config_dir.path()).defaults([
            "--cluster-node-timeout",
            &node_timeout,
            "--cluster-replica-validity-factor",
            "0",
            "--repl-diskless-sync-delay",
            "0",
        ]);
        let count = primaries * (1 + replicas_per_primary);
        let nodes = RedisCluster::start_with(count, &node)?.into_servers();
        let cluster = Self {
            nodes,
            _config_dir: config_dir,
        };
        create::create(&cluster.nodes, replicas_per_primary)?;
        cluster.wait_until_ok(FORM_TIMEOUT)?;
        Ok(cluster)
    }

    /// Number of nodes, primaries and replicas.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node (never: it has at least 3).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `redis://127.0.0.1:port` of every node, in index order: seeds for a cluster
    /// client, which learns the slot map from any of them.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// All nodes, in index order.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &RedisServer {
        &self.nodes[i]
    }

    /// Node `i`, for its fault controls ([`RedisServer::kill`], `pause`,
    /// `restart_empty`: see the type's docs for a restarted node).
    pub fn node_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.nodes[i]
    }

    /// The nodes that are primaries serving slots now, in index order, as the first
    /// running node sees them. A killed primary still counts until a replica has
    /// replaced it: the cluster has not moved its slots.
    pub fn primaries(&self) -> Result<Vec<usize>, HarnessError> {
        let view = self.view()?;
        Ok(self.indices(&view, |entry| entry.primary && !entry.slots.is_empty()))
    }

    /// The nodes that are replicas now, in index order, as the first running node sees
    /// them.
    pub fn replicas(&self) -> Result<Vec<usize>, HarnessError> {
        let view = self.view()?;
        Ok(self.indices(&view, |entry| !entry.primary))
    }

    /// The replicas of node `primary` now, in index order, as the first running node
    /// sees them; empty for a node that is not a primary.
    pub fn replicas_of(&self, primary: usize) -> Result<Vec<usize>, HarnessError> {
        let view = self.view()?;
        let Some(id) = view
            .by_port(self.nodes[primary].port())
            .map(|e| e.id.clone())
        else {
            return Ok(Vec::new());
        };
        Ok(self.indices(&view, |entry| {
            entry.primary_id.as_deref() == Some(id.as_str())
        }))
    }

    /// The hash slot of `key` (0..16384), computed as Redis does: CRC16 of the key, or
    /// of its `{hash tag}`, modulo 16384. The same as `CLUSTER KEYSLOT`, without asking.
    ///
    /// ```
    /// use quorumlock::testing::ShardedCluster;
    ///
    /// assert_eq!(ShardedCluster::key_slot("somekey"), 11058);
    /// assert_eq!(ShardedCluster::key_slot("{user1}.name"), ShardedCluster::key_slot("user1"));
    /// ```
    pub fn key_slot(key: impl AsRef<[u8]>) -> u16 {
        crate::slot::key_slot(key.as_ref())
    }

    /// The node that serves `slot` now, as the first running node sees it.
    ///
    /// # Errors
    ///
    /// [`HarnessError::InvalidRequest`] for a slot of 16384 or more, or one no node
    /// serves; as for [`primaries`](Self::primaries) otherwise.
    pub fn slot_primary(&self, slot: u16) -> Result<usize, HarnessError> {
        if slot >= crate::slot::SLOTS {
            return Err(invalid(format!(
                "there is no slot {slot}: slots are 0..16384"
            )));
        }
        let view = self.view()?;
        view.owner(slot)
            .and_then(|entry| self.index_of(entry.port))
            .ok_or_else(|| invalid(format!("no node serves slot {slot}")))
    }

    /// The node that serves `key`'s slot now: where a `SET` of the key must go.
    pub fn primary_for_key(&self, key: impl AsRef<[u8]>) -> Result<usize, HarnessError> {
        self.slot_primary(Self::key_slot(key))
    }

    /// Makes replica `replica` the primary of its shard with `CLUSTER FAILOVER FORCE`
    /// (no handshake with its primary, which may be down; the other primaries vote),
    /// and waits until it is, and until every running node is healthy and agrees again
    /// (see [`wait_until_ok`](Self::wait_until_ok)). Its former primary, if running,
    /// is then its replica. Takes about a second on an idle machine.
    ///
    /// # Errors
    ///
    /// [`HarnessError::NotRunning`] if the node was killed;
    /// [`HarnessError::InvalidRequest`] if it is not a replica;
    /// [`HarnessError::Timeout`] if the failover or the agreement after it takes more
    /// than 30 s (a failed election is asked for again every 6 s until then).
    pub fn failover(&mut self, replica: usize) -> Result<(), HarnessError> {
        let node = &self.nodes[replica];
        if !node.is_running() {
            return Err(HarnessError::NotRunning { port: node.port() });
        }
        if View::of(node)?.myself().is_none_or(|me| me.primary) {
            return Err(invalid(format!(
                "node {replica} ({}) is not a replica: only a replica can take over",
                node.addr()
            )));
        }
        let deadline = Instant::now() + FAILOVER_TIMEOUT;
        let left = || deadline.saturating_duration_since(Instant::now());
        loop {
            let () = query(node.addr(), &["CLUSTER", "FAILOVER", "FORCE"])?;
            let promoted = wait_for(FIXTURE, FAILOVER_ATTEMPT.min(left()), || {
                match View::of(node).map(|view| view.myself().is_some_and(|me| me.primary)) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(format!(
                        "node {replica} ({}) still a replica after CLUSTER FAILOVER FORCE",
                        node.addr()
                    )),
                    Err(error) => Err(format!("node {replica}: {error}")),
                }
            });
            match promoted {
                Ok(()) => break,
                Err(error) if left().is_zero() => return Err(error),
                Err(_) => {}
            }
        }
        self.wait_until_ok(left())
    }

    /// Waits until every running node says `cluster_state:ok` with all 16384 slots
    /// served by primaries not failing, knows every node, agrees with the others on
    /// which primary serves which slots and which replica follows which primary, and,
    /// if a replica, has synced with its primary.
    ///
    /// For after a fault: a replica replacing a killed primary (about
    /// [`NODE_TIMEOUT`](Self::NODE_TIMEOUT) plus an election), a restarted node
    /// rejoining. Killed nodes are not waited for, but the slots of a killed primary
    /// nobody replaced are not served, so the cluster is not ok until it is back.
    ///
    /// # Errors
    ///
    /// [`HarnessError::Timeout`] naming what the last check found missing.
    pub fn wait_until_ok(&self, timeout: Duration) -> Result<(), HarnessError> {
        wait_for(FIXTURE, timeout, || check_healthy(&self.nodes))
    }

    /// The view of the first running node that answers.
    fn view(&self) -> Result<View, HarnessError> {
        let mut last = None;
        for node in self.nodes.iter().filter(|node| node.is_running()) {
            match View::of(node) {
                Ok(view) => return Ok(view),
                Err(error) => last = Some(error),
            }
        }
        Err(last.unwrap_or(HarnessError::NotRunning {
            port: self.nodes[0].port(),
        }))
    }

    fn index_of(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|node| node.port() == port)
    }

    fn indices(&self, view: &View, keep: impl Fn(&topology::Entry) -> bool) -> Vec<usize> {
        let mut found: Vec<usize> = view
            .entries
            .iter()
            .filter(|entry| keep(entry))
            .filter_map(|entry| self.index_of(entry.port))
            .collect();
        found.sort_unstable();
        found
    }
}

fn invalid(reason: String) -> HarnessError {
    HarnessError::InvalidRequest {
        fixture: FIXTURE,
        reason,
    }
}
