//! What each kind of member costs, and what clusters buy at scale.
//!
//! Part 1, one member of each kind, one task and 16 tasks, an acquire and a
//! release per cycle on a fresh key: a single server; a Redis Cluster of 3
//! primaries; a Sentinel-managed primary (with a replica); the same with
//! `wait_for_replicas(1)`. Rounds of the kinds interleave, so that the
//! machine's drift falls on all of them alike.
//!
//! Part 2, the same workload at 64 tasks over many keys on 5 single servers
//! and on 3 members that are each a cluster of 3 primaries (9 servers):
//! throughput, latency, and how evenly the keys spread over the primaries.
//!
//! `cargo bench --bench members`; `MEMBERS_CYCLES` (default 2000) cycles per
//! task and round in part 1, `MEMBERS_SECS` (default 3) seconds per round in
//! part 2 (without `--bench`, as under `cargo test --benches`, a few). Every server runs on this machine's loopback, sharing its cores
//! with the client: see BENCHMARKS.md for what that does and does not show.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::join_all;
use quorumlock::testing::{RedisServer, SentinelSet, ShardedCluster};
use quorumlock::{Builder, QuorumLocker, SentinelMember};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(10);
const ROUNDS: usize = 2;

/// `name`'s value, else `default` under `cargo bench` (which passes
/// `--bench`), else `smoke`: a few cycles for `cargo test --benches`.
fn env(name: &str, default: u64, smoke: u64) -> u64 {
    let bench = std::env::args().any(|arg| arg == "--bench");
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(if bench { default } else { smoke })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let at = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[at]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Latencies of whole cycles and the run's length.
#[derive(Default)]
struct Sample {
    cycles: Vec<Duration>,
    elapsed: Duration,
}

impl Sample {
    fn add(&mut self, other: Sample) {
        self.cycles.extend(other.cycles);
        self.elapsed += other.elapsed;
    }

    fn line(&mut self, name: &str, floor: Option<(f64, f64)>) -> (f64, f64) {
        self.cycles.sort_unstable();
        let p50 = ms(percentile(&self.cycles, 0.5));
        let p99 = ms(percentile(&self.cycles, 0.99));
        let throughput = self.cycles.len() as f64 / self.elapsed.as_secs_f64().max(1e-9);
        let ratio = floor
            .map(|(floor_p50, floor_tput)| {
                format!(
                    "  p50 {:.2}× and throughput {:.2}× the single server's",
                    p50 / floor_p50,
                    throughput / floor_tput
                )
            })
            .unwrap_or_default();
        println!(
            "  {name:<34} p50 {p50:>6.3} ms  p99 {p99:>6.3} ms  {throughput:>8.0} cycles/s{ratio}"
        );
        (p50, throughput)
    }
}

/// Keys per task: reused round after round, as a service reuses its keys
/// (a cluster member verifies each slot once, at its first grant there).
const POOL: u64 = 100;

/// `tasks` tasks, each `cycles` cycles (or until `until`) of an acquire and a
/// release on keys of its own: from a pool of [`POOL`] named by `label`, or,
/// with `fresh`, a new key every cycle.
async fn run(
    locker: &QuorumLocker,
    tasks: usize,
    cycles: u64,
    until: Option<Instant>,
    label: &str,
    fresh: Option<&AtomicU64>,
) -> Sample {
    let start = Instant::now();
    let runs = (0..tasks).map(|task| async move {
        let mut cycles_done = Vec::new();
        for cycle in 0..cycles {
            if until.is_some_and(|until| Instant::now() >= until) {
                break;
            }
            let key = match fresh {
                Some(counter) => format!("{label}-new-{}", counter.fetch_add(1, Ordering::Relaxed)),
                None => format!("{label}-{task}-{}", cycle % POOL),
            };
            let began = Instant::now();
            let lock = locker.try_acquire(&key, TTL).await.expect("acquire");
            lock.release().await.expect("release");
            cycles_done.push(began.elapsed());
        }
        cycles_done
    });
    let done = join_all(runs).await;
    Sample {
        cycles: done.into_iter().flatten().collect(),
        elapsed: start.elapsed(),
    }
}

async fn locker(builder: Builder) -> QuorumLocker {
    let locker = builder
        .instance_timeout(Duration::from_millis(500))
        .build()
        .await
        .expect("build");
    locker.prepare().await.expect("prepare");
    locker
}

async fn part_one() {
    let cycles = env("MEMBERS_CYCLES", 2000, 20);
    let single = RedisServer::start().expect("server");
    let cluster = ShardedCluster::start(3, 0).expect("cluster");
    let sentinel = SentinelSet::start().expect("sentinel set");
    let member = || SentinelMember::new(sentinel.service_name(), sentinel.sentinel_urls());
    let kinds: Vec<(&str, QuorumLocker)> = vec![
        (
            "single server",
            locker(QuorumLocker::builder().url(single.url())).await,
        ),
        (
            "cluster of 3 primaries",
            locker(QuorumLocker::builder().cluster(cluster.urls())).await,
        ),
        (
            "sentinel primary",
            locker(QuorumLocker::builder().sentinel(member())).await,
        ),
        (
            "sentinel primary, WAIT 1 replica",
            locker(
                QuorumLocker::builder()
                    .sentinel(member().wait_for_replicas(1, Duration::from_millis(100))),
            )
            .await,
        ),
    ];
    for tasks in [1, 16] {
        let per_task = if tasks == 1 { cycles } else { cycles / 4 };
        let mut samples: Vec<Sample> = kinds.iter().map(|_| Sample::default()).collect();
        let mut first_use = Sample::default();
        let fresh = AtomicU64::new(0);
        for round in 0..ROUNDS {
            for (index, (_, locker)) in kinds.iter().enumerate() {
                let label = format!("p1-{tasks}-{index}");
                let sample = run(locker, tasks, per_task, None, &label, None).await;
                samples[index].add(sample);
            }
            let label = format!("p1-{tasks}-{round}");
            first_use.add(run(&kinds[1].1, tasks, per_task / 4, None, &label, Some(&fresh)).await);
        }
        println!("part 1: one member, {tasks} task(s), {per_task} cycles per task and round over {POOL} keys each, {ROUNDS} rounds interleaved");
        let mut floor = None;
        for ((name, _), sample) in kinds.iter().zip(&mut samples) {
            let figures = sample.line(name, floor);
            floor.get_or_insert(figures);
        }
        first_use.line("cluster, a new key every cycle", floor);
    }
}

async fn part_two() {
    let secs = env("MEMBERS_SECS", 3, 1);
    let singles: Vec<RedisServer> = (0..5)
        .map(|_| RedisServer::start().expect("server"))
        .collect();
    let clusters: Vec<ShardedCluster> = (0..3)
        .map(|_| ShardedCluster::start(3, 0).expect("cluster"))
        .collect();
    let five = locker(QuorumLocker::builder().urls(singles.iter().map(RedisServer::url))).await;
    let three = locker(
        clusters
            .iter()
            .fold(QuorumLocker::builder(), |builder, cluster| {
                builder.cluster(cluster.urls())
            }),
    )
    .await;
    let mut samples = [Sample::default(), Sample::default()];
    for _ in 0..ROUNDS {
        for (index, locker) in [&five, &three].into_iter().enumerate() {
            let until = Instant::now() + Duration::from_secs(secs);
            let label = format!("p2-{index}");
            let sample = run(locker, 64, u64::MAX, Some(until), &label, None).await;
            samples[index].add(sample);
        }
    }
    println!(
        "\npart 2: 64 tasks, {POOL} keys each, {secs} s per round, {ROUNDS} rounds interleaved"
    );
    let floor = samples[0].line("5 single servers", None);
    samples[1].line("3 clusters of 3 primaries", Some(floor));
    // How the keys of one round spread over the primaries of the first cluster.
    let mut per_primary: BTreeMap<usize, usize> = BTreeMap::new();
    let sample_keys = 64 * POOL;
    for n in 0..sample_keys {
        let key = format!("p2-1-{}-{}", n / POOL, n % POOL);
        *per_primary
            .entry(clusters[0].primary_for_key(&key).expect("primary"))
            .or_default() += 1;
    }
    let counts: Vec<usize> = per_primary.values().copied().collect();
    println!(
        "  keys over the first cluster's primaries ({sample_keys} keys as the run names them): {counts:?} \
         (most / fewest {:.3})",
        *counts.iter().max().unwrap_or(&0) as f64 / (*counts.iter().min().unwrap_or(&1)).max(1) as f64
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        part_one().await;
        part_two().await;
    });
}
