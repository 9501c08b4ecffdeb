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
//! and ours / rslock. A second table gives, per throughput cell, each side's
//! p50 cycle time against its one-task p50 (how far concurrency stretches one
//! cycle), and CPU and context switches per cycle: this process's (clients,
//! connections, proxies; `getrusage`) and the servers' (`INFO cpu`), which on
//! a shared 2-core machine is what throughput is made of. `cargo bench --bench lan` (`LAN_CYCLES` sets the latency
//! samples per side, default 1000); without `--bench` it smoke-tests.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::QuorumFloor;
use quorumlock::testing::{Direction, FaultProxy};
use quorumlock::QuorumLocker;
use redis::aio::MultiplexedConnection;

const LAN_ONE_WAY: Duration = Duration::from_micros(250);
const BLOCK: usize = 50;
const ROUNDS: usize = 5;
const SIZES: [usize; 3] = [1, 3, 5];
const TASKS: [usize; 2] = [16, 64];

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
}

impl Clients {
    async fn cycle(&self, side: Side) {
        // One counter for the whole run: keys of an earlier row are still held
        // (TTL 10 s) when the next row starts.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let key = format!("bench:lan:{}", NEXT.fetch_add(1, Ordering::Relaxed));
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
        // Direct connections for reading the servers' CPU time, past any proxy.
        let mut admin = Vec::new();
        for url in cluster.urls() {
            let client = redis::Client::open(url).expect("client");
            admin.push(client.get_multiplexed_async_connection().await.expect("connect"));
        }
        let mut cpu_rows = Vec::new();
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
            let network = if lan { "LAN (0.5 ms)" } else { "loopback" };
            for n in SIZES {
                let urls = &urls[..n];
                let clients = Arc::new(Clients {
                    floor: QuorumFloor::connect(urls).await,
                    ours: common::locker(urls).await,
                    rslock: common::rslock(urls).await,
                });
                let one_task @ [floor, ours, rsl] = latency(&clients, cycles).await;
                let mut row = format!(
                    "| {} | {n} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} / {:.0} | {:.3} / {:.3} | {:.3} |",
                    network,
                    floor.0, floor.1, ours.0, ours.1, rsl.0, rsl.1,
                    ours.0 / floor.0, ours.1 / floor.1, ours.0 / rsl.0,
                );
                for tasks in TASKS {
                    let measured = throughput(&clients, &mut admin[..n], tasks, per_round).await;
                    let [floor, ours, rsl] = measured.rates;
                    let [floor_cpu, ours_cpu, rsl_cpu] = measured.cpu;
                    let [floor_p50, ours_p50, rsl_p50] = measured.p50;
                    let [floor_one, ours_one, rsl_one] = one_task;
                    row.push_str(&format!(" {:.3}, {:.3} ({:.0}/s) |", ours / floor, ours / rsl, ours));
                    cpu_rows.push(format!(
                        "| {} | {n} | {tasks} | {:.2} / {:.2} / {:.2} | {:.1} / {:.1} / {:.1} | {:.1} / {:.1} / {:.1} | {:.2} / {:.2} / {:.2} |",
                        network,
                        floor_p50 / floor_one.0, ours_p50 / ours_one.0, rsl_p50 / rsl_one.0,
                        floor_cpu.client, ours_cpu.client, rsl_cpu.client,
                        floor_cpu.servers, ours_cpu.servers, rsl_cpu.servers,
                        floor_cpu.switches, ours_cpu.switches, rsl_cpu.switches,
                    ));
                }
                println!("{row}");
                clients.ours.settle().await;
            }
        }
        println!("\nPer cycle in the throughput rounds: floor / ours / rslock\n");
        println!("| network | N | tasks | p50 / one task's p50 | this process µs | servers µs | context switches |");
        println!("|---|---|---|---|---|---|---|");
        for row in cpu_rows {
            println!("{row}");
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
async fn throughput(
    clients: &Arc<Clients>,
    servers: &mut [MultiplexedConnection],
    tasks: usize,
    per_round: u64,
) -> Throughput {
    let mut rates: [Vec<f64>; 3] = Default::default();
    let mut cpu = [Cpu::default(); 3];
    let mut cycle_times: [Vec<Duration>; 3] = Default::default();
    for round in 0..ROUNDS {
        for turn in 0..3 {
            let index = (round + turn) % 3;
            let left = Arc::new(AtomicU64::new(per_round));
            let before = Cpu::now(servers).await;
            let started = Instant::now();
            let handles: Vec<_> = (0..tasks)
                .map(|_| {
                    let (clients, left) = (Arc::clone(clients), Arc::clone(&left));
                    tokio::spawn(async move {
                        let mut times = Vec::new();
                        while left
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                                n.checked_sub(1)
                            })
                            .is_ok()
                        {
                            let started = Instant::now();
                            clients.cycle(SIDES[index]).await;
                            times.push(started.elapsed());
                        }
                        times
                    })
                })
                .collect();
            for handle in handles {
                let times = handle.await.expect("a throughput task panicked");
                cycle_times[index].extend(times);
            }
            rates[index].push(per_round as f64 / started.elapsed().as_secs_f64());
            cpu[index].add(Cpu::now(servers).await.since(before));
        }
    }
    let cycles = (ROUNDS as u64 * per_round) as f64;
    Throughput {
        rates: rates.map(common::median),
        cpu: cpu.map(|cpu| cpu.per(cycles)),
        p50: cycle_times.map(|mut times| {
            times.sort_unstable();
            common::percentile(&times, 50)
        }),
    }
}

/// What the throughput rounds measured, per side.
struct Throughput {
    /// Cycles per second, the median round.
    rates: [f64; 3],
    /// CPU per cycle.
    cpu: [Cpu; 3],
    /// The p50 of one cycle, µs, over every round.
    p50: [f64; 3],
}

/// CPU time in µs: this process's (the clients, their connections and the
/// proxies) and the servers' (`INFO cpu`).
#[derive(Clone, Copy, Default)]
struct Cpu {
    client: f64,
    servers: f64,
    /// This process's context switches, voluntary and not.
    switches: f64,
}

impl Cpu {
    async fn now(servers: &mut [MultiplexedConnection]) -> Self {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
        // SAFETY: getrusage writes the whole struct on success, checked below.
        let usage = unsafe {
            assert_eq!(libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()), 0);
            usage.assume_init()
        };
        let micros = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
        let mut server_micros = 0.0;
        for server in servers {
            let info: String = redis::cmd("INFO")
                .arg("cpu")
                .query_async(server)
                .await
                .expect("INFO cpu");
            server_micros += info
                .lines()
                .filter_map(|line| {
                    line.strip_prefix("used_cpu_user:")
                        .or_else(|| line.strip_prefix("used_cpu_sys:"))
                })
                .map(|value| value.trim().parse::<f64>().expect("a CPU figure") * 1e6)
                .sum::<f64>();
        }
        Self {
            client: micros(usage.ru_utime) + micros(usage.ru_stime),
            servers: server_micros,
            switches: (usage.ru_nvcsw + usage.ru_nivcsw) as f64,
        }
    }

    fn since(self, before: Self) -> Self {
        Self {
            client: self.client - before.client,
            servers: self.servers - before.servers,
            switches: self.switches - before.switches,
        }
    }

    fn add(&mut self, other: Self) {
        self.client += other.client;
        self.servers += other.servers;
        self.switches += other.switches;
    }

    fn per(self, cycles: f64) -> Self {
        Self {
            client: self.client / cycles,
            servers: self.servers / cycles,
            switches: self.switches / cycles,
        }
    }
}
