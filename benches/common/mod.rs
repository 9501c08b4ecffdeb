//! Shared setup for the benches: one 5-server local cluster, and for each
//! instance count N (its first N servers) the raw floor, our locker and rslock.
//!
//! The raw floor is what any Redlock implementation must do per cycle: N
//! parallel `SET key token NX PX ttl`, then N parallel compare-and-delete by
//! `EVALSHA` of a preloaded script, each time waiting for every reply, over one
//! `MultiplexedConnection` per server.
//!
//! rslock (0.10, the registry's Redlock crate) runs with its defaults: one
//! multiplexed connection per server with redis-rs's 500 ms response timeout,
//! 3 attempts per `lock` call.
#![allow(dead_code)] // each bench uses part of it

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use futures_util::stream::{FuturesUnordered, StreamExt};
use quorumlock::testing::RedisCluster;
use quorumlock::QuorumLocker;
use redis::aio::MultiplexedConnection;
use redis::{IntoConnectionInfo, Script, Value};

/// Servers in the cluster; every N uses the first N of them.
pub const SERVERS: usize = 5;

/// The instance counts compared.
pub const SIZES: [usize; 3] = [1, 3, 5];

/// Every lock's TTL: long enough that nothing expires during a run.
pub const TTL: Duration = Duration::from_secs(10);

/// `TTL` in milliseconds, for `PX`.
const TTL_MS: u64 = 10_000;

/// The raw floor's token: fixed (only keys need to be distinct), 32 hex digits
/// like ours.
const RAW_TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// The same compare-and-delete as the crate's release script.
const RELEASE_SCRIPT: &str = r#"if redis.call("GET", KEYS[1]) == ARGV[1] then
    return redis.call("DEL", KEYS[1])
end
return 0"#;

/// Starts the cluster every bench runs against. Blocks: call it outside a runtime.
pub fn start_cluster() -> RedisCluster {
    RedisCluster::start(SERVERS)
        .expect("start 5 redis-server processes (is redis-server installed?)")
}

/// The multi-thread runtime both benches run on: 2 workers, one per core.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build the tokio runtime")
}

/// Distinct keys, so that no cycle contends with another.
pub struct Keys {
    prefix: &'static str,
    next: AtomicU64,
}

impl Keys {
    /// Keys `bench:{prefix}:0`, `bench:{prefix}:1`, …; give raw and ours prefixes
    /// of the same length so both send the same bytes.
    pub const fn new(prefix: &'static str) -> Self {
        Self {
            prefix,
            next: AtomicU64::new(0),
        }
    }

    /// The next unused key.
    pub fn next(&self) -> String {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        format!("bench:{}:{i}", self.prefix)
    }
}

/// One connection per URL for a floor, multiplexed, with the release script
/// loaded; and the script's SHA.
async fn connect_floor(urls: &[String]) -> (Vec<MultiplexedConnection>, String) {
    let script = Script::new(RELEASE_SCRIPT);
    let mut connections = Vec::with_capacity(urls.len());
    for url in urls {
        let info = url
            .as_str()
            .into_connection_info()
            .expect("valid redis URL");
        // Ours sets TCP_NODELAY on its connections; so do the floors, or
        // Nagle's algorithm would hold back their pipelined commands.
        let tcp = redis::io::tcp::TcpSettings::default().set_nodelay(true);
        let client = redis::Client::open(info.set_tcp_settings(tcp)).expect("client");
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis-server");
        script
            .prepare_invoke()
            .load_async(&mut connection)
            .await
            .expect("SCRIPT LOAD");
        connections.push(connection);
    }
    (connections, script.get_hash().to_string())
}

/// The raw floor over N servers.
pub struct RawFloor {
    connections: Vec<MultiplexedConnection>,
    release_sha: String,
}

impl RawFloor {
    /// Connects to every URL and loads the release script on each.
    pub async fn connect(urls: &[String]) -> Self {
        let (connections, release_sha) = connect_floor(urls).await;
        Self {
            connections,
            release_sha,
        }
    }

    /// One cycle on `key`: N parallel sets, then N parallel compare-and-deletes,
    /// each waiting for all N replies.
    pub async fn cycle(&self, key: &str) {
        let sets = self.connections.iter().map(|connection| {
            let mut connection = connection.clone();
            let mut set = redis::cmd("SET");
            set.arg(key).arg(RAW_TOKEN).arg("NX").arg("PX").arg(TTL_MS);
            async move { set.query_async::<Value>(&mut connection).await }
        });
        for reply in join_all(sets).await {
            assert!(
                matches!(reply.expect("SET NX PX"), Value::Okay),
                "raw SET NX PX was refused on a fresh key"
            );
        }

        let deletes = self.connections.iter().map(|connection| {
            let mut connection = connection.clone();
            let mut delete = redis::cmd("EVALSHA");
            delete.arg(&self.release_sha).arg(1).arg(key).arg(RAW_TOKEN);
            async move { delete.query_async::<i64>(&mut connection).await }
        });
        for reply in join_all(deletes).await {
            assert_eq!(
                reply.expect("EVALSHA release"),
                1,
                "raw release deleted nothing"
            );
        }
    }
}

/// The like-for-like floor of a quorum lock: N parallel `SET key token NX PX
/// ttl` decided at the quorum-th OK, then N parallel compare-and-deletes decided
/// at the quorum-th reply, each request bounded by [`QUORUM_TIMEOUT`]. Replies
/// after the decision are left to the connection: no rollback, no bookkeeping.
/// The same connections and script as the raw floor's.
pub struct QuorumFloor(RawFloor);

/// The quorum floor's per-request timeout, ours' default instance timeout.
pub const QUORUM_TIMEOUT: Duration = Duration::from_millis(50);

impl QuorumFloor {
    /// Connects to every URL and loads the release script on each.
    pub async fn connect(urls: &[String]) -> Self {
        Self(RawFloor::connect(urls).await)
    }

    /// One cycle on `key`, decided at the quorum-th reply each way.
    pub async fn cycle(&self, key: &str) {
        let RawFloor {
            connections,
            release_sha,
        } = &self.0;
        let quorum = connections.len() / 2 + 1;
        let mut sets: FuturesUnordered<_> = connections
            .iter()
            .map(|connection| {
                let mut connection = connection.clone();
                let mut set = redis::cmd("SET");
                set.arg(key).arg(RAW_TOKEN).arg("NX").arg("PX").arg(TTL_MS);
                async move {
                    tokio::time::timeout(QUORUM_TIMEOUT, set.query_async::<Value>(&mut connection))
                        .await
                }
            })
            .collect();
        let mut granted = 0;
        while let Some(reply) = sets.next().await {
            if matches!(reply, Ok(Ok(Value::Okay))) {
                granted += 1;
                if granted == quorum {
                    break;
                }
            }
        }
        assert_eq!(granted, quorum, "the quorum floor's SET NX PX was refused");
        let mut deletes: FuturesUnordered<_> = connections
            .iter()
            .map(|connection| {
                let mut connection = connection.clone();
                let mut delete = redis::cmd("EVALSHA");
                delete.arg(release_sha).arg(1).arg(key).arg(RAW_TOKEN);
                async move {
                    tokio::time::timeout(QUORUM_TIMEOUT, delete.query_async::<i64>(&mut connection))
                        .await
                }
            })
            .collect();
        let mut answered = 0;
        while deletes.next().await.is_some() {
            answered += 1;
            if answered == quorum {
                break;
            }
        }
    }
}

/// Our locker over `urls`, default settings, connected and scripts loaded.
pub async fn locker(urls: &[String]) -> QuorumLocker {
    let locker = QuorumLocker::builder()
        .urls(urls.iter().cloned())
        .build()
        .await
        .expect("build the locker");
    let ready = locker.prepare().await.expect("prepare the locker");
    assert_eq!(
        ready.reachable(),
        urls.len(),
        "every instance should be ready"
    );
    locker
}

/// One cycle of ours on `key`: `acquire`, then `release`.
pub async fn ours_cycle(locker: &QuorumLocker, key: &str) {
    let lock = locker.acquire(key, TTL).await.expect("acquire");
    lock.release().await.expect("release");
}

/// rslock over `urls`, its defaults, connected (it connects on first use).
pub async fn rslock(urls: &[String]) -> rslock::LockManager {
    let manager = rslock::LockManager::new(urls.to_vec());
    // The first lock opens the connections.
    let lock = manager
        .lock("bench:warm", TTL)
        .await
        .expect("rslock: first lock");
    manager.unlock(&lock).await;
    manager
}

/// One cycle of rslock on `key`: `lock`, then `unlock`.
pub async fn rslock_cycle(manager: &rslock::LockManager, key: &str) {
    let lock = manager.lock(key, TTL).await.expect("rslock lock");
    manager.unlock(&lock).await;
}

/// Who runs a cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The raw floor.
    Raw,
    /// The quorum floor.
    Quorum,
    /// quorumlock.
    Ours,
    /// rslock.
    Rslock,
}

impl Side {
    /// The three the `cycle` and `acquire` benches compare, in report order.
    pub const ALL: [Side; 3] = [Side::Raw, Side::Ours, Side::Rslock];

    /// All four, for the `cost` bench.
    pub const WITH_QUORUM: [Side; 4] = [Side::Raw, Side::Quorum, Side::Ours, Side::Rslock];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Side::Raw => "raw_floor",
            Side::Quorum => "quorum_floor",
            Side::Ours => "quorumlock",
            Side::Rslock => "rslock",
        }
    }
}

static RAW_KEYS: Keys = Keys::new("rawf");
static QUORUM_KEYS: Keys = Keys::new("qrmf");
static OURS_KEYS: Keys = Keys::new("ours");
static RSLOCK_KEYS: Keys = Keys::new("rslk");

/// The raw floor, our locker and rslock over the same first N servers.
pub struct Pair {
    /// How many servers.
    pub n: usize,
    /// The raw floor over them.
    pub raw: RawFloor,
    /// The quorum floor over them.
    pub quorum: QuorumFloor,
    /// Our locker over them.
    pub ours: QuorumLocker,
    /// rslock over them.
    pub rslock: rslock::LockManager,
}

impl Pair {
    /// One cycle of `side` on a fresh key (made before the cycle starts).
    pub async fn cycle(&self, side: Side) {
        match side {
            Side::Raw => {
                let key = RAW_KEYS.next();
                self.raw.cycle(&key).await;
            }
            Side::Quorum => {
                let key = QUORUM_KEYS.next();
                self.quorum.cycle(&key).await;
            }
            Side::Ours => {
                let key = OURS_KEYS.next();
                ours_cycle(&self.ours, &key).await;
            }
            Side::Rslock => {
                let key = RSLOCK_KEYS.next();
                rslock_cycle(&self.rslock, &key).await;
            }
        }
    }

    /// One cycle of `side`, timed (the key is made outside the timed span).
    pub async fn timed_cycle(&self, side: Side) -> Duration {
        let key = match side {
            Side::Raw => RAW_KEYS.next(),
            Side::Quorum => QUORUM_KEYS.next(),
            Side::Ours => OURS_KEYS.next(),
            Side::Rslock => RSLOCK_KEYS.next(),
        };
        let started = Instant::now();
        match side {
            Side::Raw => self.raw.cycle(&key).await,
            Side::Quorum => self.quorum.cycle(&key).await,
            Side::Ours => ours_cycle(&self.ours, &key).await,
            Side::Rslock => rslock_cycle(&self.rslock, &key).await,
        }
        started.elapsed()
    }
}

/// Runs `side` from `tasks` concurrent tasks, each cycling on distinct keys,
/// until `total` cycles are done; returns how long that took. Needs a
/// multi-thread runtime to use both cores.
pub async fn concurrent(pair: &Arc<Pair>, side: Side, tasks: usize, total: u64) -> Duration {
    let left = Arc::new(AtomicU64::new(total));
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let pair = Arc::clone(pair);
            let left = Arc::clone(&left);
            tokio::spawn(async move {
                // Claim a cycle, then run it, until none are left.
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    pair.cycle(side).await;
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.expect("a throughput task panicked");
    }
    started.elapsed()
}

/// One [`Pair`] per size in [`SIZES`], all over `cluster`'s servers.
pub async fn pairs(cluster: &RedisCluster) -> Vec<Pair> {
    let urls = cluster.urls();
    let mut pairs = Vec::with_capacity(SIZES.len());
    for n in SIZES {
        let urls = &urls[..n];
        pairs.push(Pair {
            n,
            raw: RawFloor::connect(urls).await,
            quorum: QuorumFloor::connect(urls).await,
            ours: locker(urls).await,
            rslock: rslock(urls).await,
        });
    }
    pairs
}

/// Nearest-rank percentile `percent` of sorted `samples`, in µs.
pub fn percentile(sorted: &[Duration], percent: usize) -> f64 {
    assert!(!sorted.is_empty(), "no samples");
    let rank = (percent * sorted.len()).div_ceil(100);
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1e6
}

/// The median of some values.
pub fn median(mut values: Vec<f64>) -> f64 {
    assert!(!values.is_empty(), "no values");
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
