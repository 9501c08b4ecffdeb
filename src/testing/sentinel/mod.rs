//! A primary, its replica and three Sentinels watching them, on loopback ports.
//!
//! For tests of a Sentinel-managed primary as a quorum member: a client that asks
//! the Sentinels where the primary is, and a failover that moves it.
//!
//! Here, the fixture and its controls; in `config`, the Sentinels' configuration; in
//! `view`, what the Sentinels report and the check that they agree.

mod config;
mod view;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::probe::{info_field, query, wait_for};
use super::server::{RedisServer, RedisServerBuilder};
use super::{HarnessError, RedisCluster};

const FIXTURE: &str = "SentinelSet";
const SENTINELS: usize = 3;
/// For the replica's first sync, and then for the Sentinels to find the primary,
/// the replica and each other (their hellos go out every 2 s): about 2 s on an idle
/// machine.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// For [`SentinelSet::failover`] as a whole.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// Between two `SENTINEL FAILOVER`s refused for want of a replica the Sentinel trusts.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// A primary, one replica (`--replicaof`) and three Sentinels monitoring the primary
/// under [`service_name`](Self::service_name) with quorum 2, all `redis-server`
/// processes on `127.0.0.1`; all are killed when it is dropped.
///
/// [`primary`](Self::primary) and [`replica`](Self::replica) are the servers
/// *started* as primary and replica: after a failover the roles are swapped, and
/// [`current_primary_addr`](Self::current_primary_addr) says which is which. A
/// restarted replica ([`RedisServer::restart_empty`]) comes back as a replica of
/// the server started as primary, whatever the roles are then; the Sentinels
/// reconfigure it if need be.
///
/// The Sentinels run with `down-after-milliseconds 1000`
/// ([`DOWN_AFTER`](Self::DOWN_AFTER)), `failover-timeout 5000` and
/// `resolve-hostnames no`, from configuration files in a directory of the
/// fixture's, which they rewrite with what they learn (and read back after a
/// restart). A killed primary is thus replaced by its replica within a few seconds,
/// as the Sentinels agree; [`wait_for_primary_change`](Self::wait_for_primary_change)
/// waits for that. A Sentinel paused for over 2 s enters its TILT mode and takes
/// no action for 30 s.
///
/// The fixture's checks speak no `AUTH`: leave `--requirepass` out of
/// [`start_with`](Self::start_with)'s builder. It needs a local `redis-server`, not
/// the Docker fallback.
#[derive(Debug)]
pub struct SentinelSet {
    primary: RedisServer,
    replica: RedisServer,
    sentinels: Vec<RedisServer>,
    /// The Sentinels' configuration files; dropped after them (fields drop in order).
    _config_dir: TempDir,
}

impl SentinelSet {
    /// The name the Sentinels know the primary by: [`service_name`](Self::service_name).
    pub const SERVICE_NAME: &'static str = "quorumlock";
    /// The Sentinels' `down-after-milliseconds`: how long the primary may not answer
    /// before a Sentinel counts it as down, and, once two agree, fails it over.
    pub const DOWN_AFTER: Duration = Duration::from_millis(1000);

    /// Starts the primary and the replica, waits for the replica's sync, then starts
    /// the Sentinels and waits until they are ready; see
    /// [`wait_until_ready`](Self::wait_until_ready).
    ///
    /// # Errors
    ///
    /// [`HarnessError::Timeout`] when the replica does not sync or the Sentinels do
    /// not find everyone in 30 s, naming what the last check found missing; otherwise
    /// as for [`RedisServer::start`].
    pub fn start() -> Result<Self, HarnessError> {
        Self::start_with(&RedisServerBuilder::default())
    }

    /// As [`start`](Self::start), with the primary and the replica (not the
    /// Sentinels) started from `builder`'s settings: extra arguments, environment, or
    /// the clock shim ([`RedisServerBuilder::clock_rate`]).
    pub fn start_with(builder: &RedisServerBuilder) -> Result<Self, HarnessError> {
        // Replicas sync at once, rather than after Redis's 5 s wait for more of them.
        let data = builder
            .clone()
            .defaults(["--repl-diskless-sync-delay", "0"]);
        let primary = data.start()?;
        let replica = data
            .clone()
            .args(["--replicaof", "127.0.0.1", &primary.port().to_string()])
            .start()?;
        // Before the Sentinels start: a Sentinel learns of replicas from the primary's
        // `INFO`, which it asks for at once and then only every 10 s.
        wait_for(FIXTURE, READY_TIMEOUT, || replicates(replica.addr(), None))?;

        let config_dir = tempfile::Builder::new()
            .prefix("quorumlock-sentinel-")
            .tempdir()?;
        let builders = (0..SENTINELS)
            .map(|i| {
                let path = config_dir.path().join(format!("sentinel-{i}.conf"));
                config::write(&path, Self::SERVICE_NAME, primary.addr(), Self::DOWN_AFTER)?;
                Ok(RedisServerBuilder::default()
                    .config_file(path)
                    .arg("--sentinel"))
            })
            .collect::<Result<Vec<_>, HarnessError>>()?;
        let sentinels = RedisCluster::start_each(&builders)?.into_servers();
        let set = Self {
            primary,
            replica,
            sentinels,
            _config_dir: config_dir,
        };
        set.wait_until_ready(READY_TIMEOUT)?;
        Ok(set)
    }

    /// `redis://127.0.0.1:port` of every Sentinel, in index order: what a client that
    /// finds the primary through Sentinel is given, with
    /// [`service_name`](Self::service_name).
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(RedisServer::url).collect()
    }

    /// The name the Sentinels monitor the primary under ([`SERVICE_NAME`](Self::SERVICE_NAME)).
    pub fn service_name(&self) -> &str {
        Self::SERVICE_NAME
    }

    /// The server started as the primary (a replica after a failover).
    pub fn primary(&self) -> &RedisServer {
        &self.primary
    }

    /// The server started as the primary, for its fault controls.
    pub fn primary_mut(&mut self) -> &mut RedisServer {
        &mut self.primary
    }

    /// The server started as the replica (the primary after a failover).
    pub fn replica(&self) -> &RedisServer {
        &self.replica
    }

    /// The server started as the replica, for its fault controls.
    pub fn replica_mut(&mut self) -> &mut RedisServer {
        &mut self.replica
    }

    /// All Sentinels, in index order.
    pub fn sentinels(&self) -> &[RedisServer] {
        &self.sentinels
    }

    /// Sentinel `i`, for its fault controls; panics if `i` is out of range.
    pub fn sentinel_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.sentinels[i]
    }

    /// The primary's address as the first running Sentinel that answers reports it
    /// (`SENTINEL get-master-addr-by-name`).
    pub fn current_primary_addr(&self) -> Result<SocketAddr, HarnessError> {
        let mut last = None;
        for sentinel in self.sentinels.iter().filter(|s| s.is_running()) {
            match view::primary_addr(sentinel, Self::SERVICE_NAME) {
                Ok(addr) => return Ok(addr),
                Err(error) => last = Some(error),
            }
        }
        Err(last.unwrap_or(HarnessError::NotRunning {
            port: self.sentinels[0].port(),
        }))
    }

    /// Fails the primary over to the replica with `SENTINEL FAILOVER` (no agreement
    /// needed: the old primary may be up) and waits until every running Sentinel
    /// reports the new primary's address and that server says it is a primary.
    /// Returns the new address. Takes a second or two.
    ///
    /// The old primary, if up, goes on taking writes as a primary until the
    /// Sentinels make it a replica, about 10 s later (they wait 8 s for other
    /// configurations, and read its `INFO` every 10 s): a window a test may want.
    /// [`wait_until_ready`](Self::wait_until_ready) waits for the end of it; call it
    /// before another failover, so that the server promoted is a synced replica.
    ///
    /// # Errors
    ///
    /// [`HarnessError::Command`] if the Sentinel refuses (e.g. `NOGOODSLAVE` for
    /// 30 s: the replica is down); [`HarnessError::Timeout`] if the Sentinels do not
    /// all report the new address in 30 s.
    pub fn failover(&mut self) -> Result<SocketAddr, HarnessError> {
        let deadline = Instant::now() + FAILOVER_TIMEOUT;
        let old = self.current_primary_addr()?;
        let sentinel =
            self.sentinels
                .iter()
                .find(|s| s.is_running())
                .ok_or(HarnessError::NotRunning {
                    port: self.sentinels[0].port(),
                })?;
        loop {
            match query::<()>(
                sentinel.addr(),
                &["SENTINEL", "FAILOVER", Self::SERVICE_NAME],
            ) {
                Ok(()) => break,
                // One already runs (an automatic one, say): it moves the primary too.
                Err(HarnessError::Command { source, .. }) if source.code() == Some("INPROG") => {
                    break
                }
                // The Sentinel does not trust a replica yet (its last `INFO` of it is
                // old, or it has not seen its link to the primary up).
                Err(HarnessError::Command { ref source, .. })
                    if source.code() == Some("NOGOODSLAVE") && Instant::now() < deadline =>
                {
                    std::thread::sleep(RETRY_PAUSE);
                }
                Err(error) => return Err(error),
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        self.wait_for_primary_change(old, left)
    }

    /// Waits until every running Sentinel reports a primary other than `from`, all the
    /// same one, and that server says it is a primary; returns its address.
    ///
    /// For a failover the Sentinels start themselves, after the primary was killed
    /// or paused for longer than [`DOWN_AFTER`](Self::DOWN_AFTER): give it several
    /// seconds, as the Sentinels must first agree it is down and elect a leader.
    pub fn wait_for_primary_change(
        &self,
        from: SocketAddr,
        timeout: Duration,
    ) -> Result<SocketAddr, HarnessError> {
        wait_for(FIXTURE, timeout, || {
            let addr = view::agreed_primary(&self.sentinels, Self::SERVICE_NAME)?;
            if addr == from {
                return Err(format!("the Sentinels still report the primary at {from}"));
            }
            let role: Vec<redis::Value> =
                query(addr, &["ROLE"]).map_err(|e| format!("the new primary: {e}"))?;
            match role.first() {
                Some(redis::Value::BulkString(role)) if role == b"master" => Ok(addr),
                _ => Err(format!("{addr} does not say it is a primary yet")),
            }
        })
    }

    /// Waits until every running Sentinel monitors the same primary, one of the set's
    /// two servers, without counting it down, knows the other Sentinels and lists the
    /// other server as a replica, up; and that server says it is the primary's
    /// replica, synced.
    ///
    /// For after a fault or a failover: when it returns, both servers have the roles
    /// the Sentinels give them. After [`failover`](Self::failover) that takes about
    /// 10 s, until the Sentinels make the old primary a replica.
    ///
    /// # Errors
    ///
    /// [`HarnessError::Timeout`] naming what the last check found missing.
    pub fn wait_until_ready(&self, timeout: Duration) -> Result<(), HarnessError> {
        let servers = [self.primary.addr(), self.replica.addr()];
        wait_for(FIXTURE, timeout, || {
            let (primary, replica) =
                view::check_ready(&self.sentinels, Self::SERVICE_NAME, servers)?;
            replicates(replica, Some(primary))
        })
    }
}

/// `Ok` once the server at `replica` says it is a replica (of `primary`, if given)
/// with its link up: its sync is done.
fn replicates(replica: SocketAddr, primary: Option<SocketAddr>) -> Result<(), String> {
    let info: String =
        query(replica, &["INFO", "replication"]).map_err(|e| format!("replica {replica}: {e}"))?;
    let field = |name| info_field(&info, name).unwrap_or("none");
    let follows = format!("{}:{}", field("master_host"), field("master_port"));
    if primary.is_some_and(|primary| follows != primary.to_string()) {
        return Err(format!(
            "{replica} is not a replica of the primary at {} yet (role:{}, primary {follows})",
            primary.map_or_else(String::new, |p| p.to_string()),
            field("role"),
        ));
    }
    match field("master_link_status") {
        "up" => Ok(()),
        status => Err(format!(
            "replica {replica} not synced with its primary (role:{}, master_link_status:{status})",
            field("role"),
        )),
    }
}
