//! Real Redis servers for tests, benchmarks and examples (cargo feature `testing`).
//!
//! [`RedisServer`] runs one `redis-server` child process on a free loopback port with
//! persistence off and its own temporary directory; [`RedisCluster`] runs several,
//! independent of each other (the N instances of a Redlock deployment, despite its
//! name). Both expose fault controls (kill, pause, resume, restart empty) so tests can
//! exercise the lock's quorum logic against real failures rather than mocks.
//!
//! Two fixtures run the deployments a single quorum member may be:
//!
//! - [`ShardedCluster`]: a real Redis Cluster (`--cluster-enabled`, joined by
//!   `redis-cli --cluster create`) of 3 or more primaries, with a replica each or
//!   none; with the slot of a key, its primary, and a forced failover.
//! - [`SentinelSet`]: a primary, its replica and three Sentinels; with where the
//!   Sentinels say the primary is, and a failover that moves it.
//!
//! Both are built from [`RedisServer`]s, so each node or Sentinel has the same fault
//! controls, and both wait until the whole deployment is healthy, within a bound,
//! failing with a [`HarnessError::Timeout`] that says what was still missing.
//!
//! The binary is `$REDIS_SERVER_BIN` if set, else `redis-server` on `PATH`. When neither
//! exists and the `testcontainers` feature is on, `redis:7-alpine` Docker containers are
//! used instead (reached on `127.0.0.1`, so Docker must run locally; `pid()` and
//! `log_path()` are then `None`; [`ShardedCluster`] and [`SentinelSet`] need a local
//! binary). Otherwise starting fails with [`HarnessError::NotInstalled`], which says
//! what to install: a missing server is an error, never a silently skipped test.
//!
//! Starting and controlling servers blocks the calling thread for at most a few seconds;
//! that is fine inside `#[tokio::test]` but keep it out of latency-sensitive tasks.
//!
//! # Examples
//!
//! Independent servers:
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use quorumlock::testing::RedisCluster;
//!
//! let mut cluster = RedisCluster::start(3)?;
//! let urls = cluster.urls(); // hand these to the lock under test
//! assert_eq!(urls.len(), 3);
//!
//! cluster.pause(0)?; // instance 0 stops answering, its keys survive
//! cluster.resume(0)?;
//! cluster.kill(1)?; // instance 1 refuses connections
//! cluster.restart_empty(1)?; // back on the same port, with no keys
//! # Ok(())
//! # }
//! ```
//!
//! A Redis Cluster of three primaries (about 2 s to start, mostly redis-cli's own
//! one-second waits):
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use quorumlock::testing::ShardedCluster;
//!
//! let cluster = ShardedCluster::start(3, 0)?; // `start(3, 1)`: a replica each
//! let seeds = cluster.urls(); // for a cluster client
//! assert_eq!(seeds.len(), 3);
//!
//! let owner = cluster.primary_for_key("nightly-report")?; // the node serving its slot
//! let mut connection = redis::Client::open(cluster.node(owner).url())?.get_connection()?;
//! redis::cmd("SET").arg("nightly-report").arg(1).exec(&mut connection)?;
//! // With replicas: `cluster.failover(replica)?` makes one the primary of its shard.
//! # Ok(())
//! # }
//! ```
//!
//! A primary watched by Sentinels (about 2 s to start, as the Sentinels find each
//! other):
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use quorumlock::testing::SentinelSet;
//!
//! let mut set = SentinelSet::start()?;
//! let sentinels = set.sentinel_urls(); // with `set.service_name()`, for a client
//! assert_eq!(set.current_primary_addr()?, set.primary().addr());
//!
//! let moved_to = set.failover()?; // about a second
//! assert_eq!(moved_to, set.replica().addr());
//! # drop(sentinels);
//! # Ok(())
//! # }
//! ```
//!
//! Servers are killed and reaped when dropped; on Linux they are also killed by the
//! kernel if the test process dies without unwinding (`PR_SET_PDEATHSIG`).

mod checker;
mod clock;
mod cluster;
mod probe;
mod proxy;
mod scenario;
mod sentinel;
mod server;
mod sharded;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use checker::{Checker, Excess, Tenure, Violation};
pub use cluster::RedisCluster;
pub use proxy::{Direction, FaultProxy};
pub use scenario::{Failure, Fault, Report, Scenario, ScenarioClient, Summary};
pub use sentinel::SentinelSet;
pub use server::{RedisServer, RedisServerBuilder};
pub use sharded::ShardedCluster;

/// Why the fixture could not start or control a server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// No backend is available on this machine.
    #[error(
        "redis-server not found: {}, or enable the `testcontainers` feature on a machine with \
         Docker",
        INSTALL_ADVICE
    )]
    NotInstalled,
    /// The server process could not be spawned.
    #[error("could not spawn {bin}: {source}")]
    Spawn {
        /// The binary that was run.
        bin: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The server did not answer `PING` in time, or exited during startup.
    #[error(
        "redis-server on port {port} did not become ready: {reason}\n--- log tail ---\n{log_tail}"
    )]
    NotReady {
        /// The port it was started on.
        port: u16,
        /// What went wrong, e.g. the exit status.
        reason: String,
        /// The last lines of the server's log.
        log_tail: String,
    },
    /// A signal could not be delivered.
    #[error("could not send {signal} to pid {pid}: {source}")]
    Signal {
        /// Name of the signal, e.g. `SIGSTOP`.
        signal: &'static str,
        /// The target process.
        pid: u32,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The operation needs a running server, but it was killed.
    #[error("redis server on port {port} is not running")]
    NotRunning {
        /// The server's port.
        port: u16,
    },
    /// The operation is not available on this backend.
    #[error("{0} is not supported by this backend")]
    Unsupported(&'static str),
    /// Docker or testcontainers failed.
    #[error("docker: {0}")]
    Docker(String),
    /// A clock rate the clock shim cannot run; see [`RedisServerBuilder::clock_rate`].
    #[error("invalid clock rate {rate}: it must be a finite number from 0.001 to 1000")]
    InvalidClockRate {
        /// The rejected rate.
        rate: f64,
    },
    /// A clock offset the clock shim cannot apply; see
    /// [`RedisServerBuilder::clock_offset_ms`].
    #[error("invalid clock offset {offset_ms} ms: it must be within ±10^12 ms (about 31 years)")]
    InvalidClockOffset {
        /// The rejected offset, in milliseconds.
        offset_ms: i64,
    },
    /// The server runs without the clock shim, so its clock cannot be changed.
    #[error(
        "redis server on port {port} runs without the clock shim: start it with \
         `RedisServer::builder().clock_rate(1.0)` to change its clock later"
    )]
    NoClockShim {
        /// The server's port.
        port: u16,
    },
    /// The clock shim (`src/testing/clock_rate.c`) could not be built.
    #[error("could not build the clock shim: {step}: {detail}")]
    ClockShim {
        /// The step that failed, e.g. `find a C compiler`.
        step: &'static str,
        /// What went wrong and what to do about it, e.g. the compiler's errors.
        detail: String,
    },
    /// A fixture was asked for something it cannot do: a Redis Cluster of fewer than 3
    /// primaries, say, or a failover to a node that is not a replica.
    #[error("{fixture}: {reason}")]
    InvalidRequest {
        /// The fixture asked, e.g. `ShardedCluster`.
        fixture: &'static str,
        /// What is wrong with the request.
        reason: String,
    },
    /// A command a fixture sent to one of its servers failed, e.g. `CLUSTER FAILOVER`.
    #[error("`{command}` on {addr} failed: {source}")]
    Command {
        /// The server's address.
        addr: SocketAddr,
        /// The command, with its arguments.
        command: String,
        /// The error redis-rs reported.
        source: redis::RedisError,
    },
    /// A tool a fixture runs, e.g. `redis-cli --cluster create`, failed.
    #[error("{command} failed: {reason}\n--- output ---\n{output}")]
    Tool {
        /// The command line.
        command: String,
        /// The exit status, or why it was stopped.
        reason: String,
        /// What it printed (stdout and stderr).
        output: String,
    },
    /// A fixture of several servers did not reach the state it waits for in time.
    #[error("{fixture} not ready within {waited:?}: {missing}")]
    Timeout {
        /// The fixture, e.g. `ShardedCluster`.
        fixture: &'static str,
        /// How long it waited.
        waited: Duration,
        /// What the last check found missing, e.g. a node's `cluster_state:fail`.
        missing: String,
    },
    /// Any other I/O failure (temporary directory, free port lookup, reaping a child).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

const INSTALL_ADVICE: &str = "install it (Debian/Ubuntu: `apt-get install -y redis-server`; \
     macOS: `brew install redis`) or set REDIS_SERVER_BIN";

/// `$REDIS_SERVER_BIN` when set (spawning reports it if it is wrong), else `redis-server`
/// from `PATH`.
fn redis_server_bin() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("REDIS_SERVER_BIN").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(bin));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("redis-server"))
        .find(|candidate| is_executable(candidate))
}

/// `$REDIS_CLI_BIN` when set, else `redis-cli` beside the redis-server that runs (so
/// that a `$REDIS_SERVER_BIN` build brings its own), else from `PATH`, else plain
/// `redis-cli` (spawning it then reports it missing).
fn redis_cli_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("REDIS_CLI_BIN").filter(|v| !v.is_empty()) {
        return PathBuf::from(bin);
    }
    let beside_server = redis_server_bin()
        .and_then(|server| Some(server.parent()?.join("redis-cli")))
        .filter(|candidate| is_executable(candidate));
    let on_path = || {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|dir| dir.join("redis-cli"))
            .find(|candidate| is_executable(candidate))
    };
    beside_server
        .or_else(on_path)
        .unwrap_or_else(|| PathBuf::from("redis-cli"))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
