//! quorumlock against the like-for-like floor of a quorum lock and rslock, on
//! loopback and over a simulated LAN, as ratios from one interleaved run.
//!
//! The quorum floor is the least a Redlock client must do per cycle: N parallel
//! `SET key token NX PX ttl` decided at the quorum-th OK, then N parallel
//! compare-and-deletes (`EVALSHA` of a preloaded script) decided at the
//! quorum-th reply, each request bounded by a 50 ms timeout, over one
//! `MultiplexedConnection` per server with TCP_NODELAY. Replies after the
//! decision are left to the connection (no rollback, no bookkeeping).
//!
//! The LAN: an in-process `FaultProxy` in front of every server adds 250 µs
//! each way (a 0.5 ms round trip). The proxies run on the bench's own runtime,
//! so they cost every side the same CPU.
//!
//! For N = 1, 3, 5 it prints one-task latency (p50 / p99 of acquire + release,
//! the three sides in interleaved blocks) and uncontended throughput from 16
//! and 64 tasks (median of interleaved rounds), then the ratios ours / floor
//! and ours / rslock. `cargo bench --bench lan` (`LAN_CYCLES` sets the latency
//! samples per side, default 1000); without `--bench` it smoke-tests.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use quorumlock::testing::{Direction, FaultProxy};
use quorumlock::QuorumLocker;
use redis::aio::MultiplexedConnection;
use redis::{IntoConnectionInfo, Script, Value};

const LAN_ONE_WAY: Duration = Duration::from_micros(250);
const TIMEOUT: Duration = Duration::from_millis(50);
const TOKEN: &str = "0123456789abcdef0123456789abcdef";
const RELEASE: &str = r#"if redis.call("GET", KEYS[1]) == ARGV[1] then
    return redis.call("DEL", KEYS[1])
end
return 0"#;
const BLOCK: usize = 50;
const ROUNDS: usize = 5;
const SIZES: [usize; 3] = [1, 3, 5];
const TASKS: [usize; 2] = [16, 64];

/// The like-for-like floor of a quorum lock.
struct QuorumFloor {
    connections: Vec<MultiplexedConnection>,
    release_sha: String,
}

impl QuorumFloor {
    async fn connect(urls: &[String]) -> Self {
        let script = Script::new(RELEASE);
        let mut connections = Vec::new();
        for url in urls {
            let info = url.as_str().into_connection_info().expect("valid URL");
            let tcp = redis::io::tcp::TcpSettings::default().set_nodelay(true);
            let client = redis::Client::open(info.set_tcp_settings(tcp)).expect("client");
            let mut connection = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect");
            script
                .prepare_invoke()
                .load_async(&mut connection)
                .await
                .expect("SCRIPT LOAD");
            connections.push(connection);
        }
        Self {
            connections,
            release_sha: script.get_hash().to_string(),
        }
    }

    async fn cycle(&self, key: &str) {
        let quorum = self.connections.len() / 2 + 1;
        let mut sets: FuturesUnordered<_> = self
            .connections
            .iter()
            .map(|connection| {
                let mut connection = connection.clone();
                let mut set = redis::cmd("SET");
                set.arg(key).arg(TOKEN).arg("NX").arg("PX").arg(10_000);
                async move {
                    tokio::time::timeout(TIMEOUT, set.query_async::<Value>(&mut connection)).await
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
        assert_eq!(granted, quorum, "the floor's SET NX PX was refused");
        let mut deletes: FuturesUnordered<_> = self
            .connections
            .iter()
            .map(|connection| {
                let mut connection = connection.clone();
                let mut delete = redis::cmd("EVALSHA");
                delete.arg(&self.release_sha).arg(1).arg(key).arg(TOKEN);
                async move {
                    tokio::time::timeout(TIMEOUT, delete.query_async::<i64>(&mut connection)).await
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

#[derive(Clone, Copy)]
enum Side {
    Floor,
    Ours,
    Rslock,
}

const SIDES: [Side; 3] = [Side::Floor, Side::Ours, Side::Rslock];

struct Clients {
    floor: QuorumFloor,
    ours: QuorumLocker,
    rslock: rslock::LockManager,
    next: AtomicU64,
}

impl Clients {
    async fn cycle(&self, side: Side) {
        let key = format!("bench:lan:{}", self.next.fetch_add(1, Ordering::Relaxed));
        match side {
            Side::Floor => self.floor.cycle(&key).await,
            Side::Ours => common::ours_cycle(&self.ours, &key).await,
            Side::Rslock => common::rslock_cycle(&self.rslock, &key).await,
        }
    }
}

fn main() {
    let bench = std::env::args().any(|arg| arg == "--bench");
    let cycles: usize = std::env::var("LAN_CYCLES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(if bench { 1000 } else { 10 });
    let per_round: u64 = if bench { 2000 } else { 64 };
    let cluster = common::start_cluster();
    let runtime = common::runtime();
    println!("quorumlock / quorum floor / rslock 0.10; {cycles} latency cycles per side; µs and cycles/s\n");
    println!("| network | N | floor p50 / p99 | ours p50 / p99 | rslock p50 / p99 | ours/floor p50 / p99 | ours/rslock p50 | 16 tasks: ours/floor, ours/rslock | 64 tasks: ours/floor, ours/rslock |");
    println!("|---|---|---|---|---|---|---|---|---|");
    runtime.block_on(async {
        for lan in [false, true] {
            let mut proxies = Vec::new();
            let mut urls = cluster.urls();
            if lan {
                for (i, url) in urls.iter_mut().enumerate() {
                    let proxy = FaultProxy::start(cluster.server(i).addr())
                        .await
                        .expect("proxy");
                    proxy.set_latency(Direction::Both, LAN_ONE_WAY);
                    *url = proxy.url();
                    proxies.push(proxy);
                }
            }
            for n in SIZES {
                let urls = &urls[..n];
                let clients = Arc::new(Clients {
                    floor: QuorumFloor::connect(urls).await,
                    ours: common::locker(urls).await,
                    rslock: common::rslock(urls).await,
                    next: AtomicU64::new(0),
                });
                let [floor, ours, rsl] = latency(&clients, cycles).await;
                let mut row = format!(
                    "| {} | {n} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} / {:.0} | {:.3} / {:.3} | {:.3} |",
                    if lan { "LAN (0.5 ms)" } else { "loopback" },
                    floor.0, floor.1, ours.0, ours.1, rsl.0, rsl.1,
                    ours.0 / floor.0, ours.1 / floor.1, ours.0 / rsl.0,
                );
                for tasks in TASKS {
                    let [floor, ours, rsl] = throughput(&clients, tasks, per_round).await;
                    row.push_str(&format!(" {:.3}, {:.3} ({:.0}/s) |", ours / floor, ours / rsl, ours));
                }
                println!("{row}");
                clients.ours.settle().await;
            }
        }
    });
}

/// p50 and p99 in µs of each side, interleaved in blocks that rotate.
async fn latency(clients: &Arc<Clients>, cycles: usize) -> [(f64, f64); 3] {
    for side in SIDES {
        for _ in 0..(cycles / 10).max(1) {
            clients.cycle(side).await;
        }
    }
    let mut samples: [Vec<Duration>; 3] = Default::default();
    let mut round = 0;
    while samples.iter().any(|side| side.len() < cycles) {
        for turn in 0..3 {
            let index = (round + turn) % 3;
            let count = BLOCK.min(cycles - samples[index].len());
            for _ in 0..count {
                let started = Instant::now();
                clients.cycle(SIDES[index]).await;
                samples[index].push(started.elapsed());
            }
        }
        round += 1;
    }
    samples.map(|mut samples| {
        samples.sort_unstable();
        (
            common::percentile(&samples, 50),
            common::percentile(&samples, 99),
        )
    })
}

/// Cycles per second of each side from `tasks` tasks: the median of
/// interleaved rounds.
async fn throughput(clients: &Arc<Clients>, tasks: usize, per_round: u64) -> [f64; 3] {
    let mut rates: [Vec<f64>; 3] = Default::default();
    for round in 0..ROUNDS {
        for turn in 0..3 {
            let index = (round + turn) % 3;
            let left = Arc::new(AtomicU64::new(per_round));
            let started = Instant::now();
            let handles: Vec<_> = (0..tasks)
                .map(|_| {
                    let (clients, left) = (Arc::clone(clients), Arc::clone(&left));
                    tokio::spawn(async move {
                        while left
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                                n.checked_sub(1)
                            })
                            .is_ok()
                        {
                            clients.cycle(SIDES[index]).await;
                        }
                    })
                })
                .collect();
            for handle in handles {
                handle.await.expect("a throughput task panicked");
            }
            rates[index].push(per_round as f64 / started.elapsed().as_secs_f64());
        }
    }
    rates.map(common::median)
}
