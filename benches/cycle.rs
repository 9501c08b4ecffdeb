//! Latency and throughput of acquire + release against the raw floor and rslock,
//! as ratios measured in one run.
//!
//! On one local 5-server cluster (N = 1, 3, 5 use its first N servers), it prints:
//!
//! 1. **latency**: p50 / p99 of one cycle — `acquire(key, 10 s)` + `release`
//!    ("ours"), the raw floor (N parallel `SET NX PX`, then N parallel `EVALSHA`
//!    compare-and-delete, waiting for every reply) and rslock (`lock` +
//!    `unlock`) — in interleaved blocks whose order rotates, so machine noise
//!    hits all three alike; and the ratios ours / raw and ours / rslock;
//! 2. **throughput**: uncontended cycles per second (distinct keys) at N = 5 from
//!    1, 16 and 64 concurrent tasks, in interleaved rounds; the median round per
//!    side, and the ratios;
//! 3. **one instance paused** (N = 5, instance 4 `SIGSTOP`ped): ours' p50 / p99
//!    against the healthy p50 / p99 of part 1, and a few rslock cycles (about a
//!    second each: its 500 ms response timeout, on lock and on unlock);
//! 4. **majority paused** (instances 2, 3, 4): how long until each returns an
//!    error: ours `acquire` with a 1 s wait, ours `try_acquire`, rslock `lock`.
//!
//! Run with `cargo bench --bench cycle` (about a minute and a half);
//! `CYCLES=20000 cargo bench --bench cycle` takes more latency samples (default
//! 3000 per side and size) and scales the throughput rounds alike. Without
//! `--bench` (as under `cargo test --benches`) and without `CYCLES` it only
//! smoke-tests, with a handful of cycles.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Pair, Side};
use quorumlock::Error;

/// Latency samples per side and size unless `CYCLES` says otherwise.
const DEFAULT_CYCLES: usize = 3_000;

/// Latency samples per side and size in a smoke test (run without `--bench`).
const SMOKE_CYCLES: usize = 20;

/// Cycles per side before the next side's turn.
const BLOCK: usize = 50;

/// At most this many untimed warm-up cycles per side and size.
const MAX_WARM_UP: usize = 300;

/// Concurrent tasks of the throughput part.
const TASKS: [usize; 3] = [1, 16, 64];

/// Throughput rounds per side and task count; each side's median round counts.
const ROUNDS: usize = 7;

/// The instance stopped in part 3.
const PAUSED: usize = 4;

/// The instances stopped in part 4.
const MAJORITY: [usize; 3] = [2, 3, 4];

/// rslock cycles with an instance paused (each takes about a second).
const RSLOCK_PAUSED_CYCLES: usize = 5;

/// How long to wait, after resuming, for our background work.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// p50 and p99 of one side, in µs.
#[derive(Clone, Copy)]
struct Percentiles {
    p50: f64,
    p99: f64,
}

fn main() {
    let cycles = cycles();
    let smoke = cycles == SMOKE_CYCLES && std::env::var_os("CYCLES").is_none();
    let warm_up = (cycles / 10).clamp(1, MAX_WARM_UP);

    let mut cluster = common::start_cluster();
    let runtime = common::runtime();
    let pairs: Vec<Arc<Pair>> = runtime
        .block_on(common::pairs(&cluster))
        .into_iter()
        .map(Arc::new)
        .collect();
    let n5 = pairs
        .iter()
        .position(|pair| pair.n == common::SERVERS)
        .expect("N = 5 is among the sizes");

    println!(
        "quorumlock vs the raw floor and rslock 0.10: one acquire+release cycle\n\
         {cycles} timed cycles per side and size (after {warm_up} warm-up), interleaved \
         in blocks of {BLOCK}; TTL {:?}; tokio multi-thread, 2 workers\n",
        common::TTL
    );
    println!(
        "{:<4} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9} {:>9}",
        "N",
        "raw p50",
        "raw p99",
        "ours p50",
        "ours p99",
        "rsl p50",
        "rsl p99",
        "p50 o/raw",
        "p99 o/raw",
        "p50 o/rsl",
        "p99 o/rsl"
    );
    let mut healthy_n5 = None;
    for pair in &pairs {
        let pair_task = Arc::clone(pair);
        let [raw, ours, rsl] = runtime
            .block_on(runtime.spawn(async move { latency(&pair_task, cycles, warm_up).await }))
            .expect("the latency task panicked");
        println!(
            "{:<4} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} | {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
            pair.n,
            raw.p50,
            raw.p99,
            ours.p50,
            ours.p99,
            rsl.p50,
            rsl.p99,
            ours.p50 / raw.p50,
            ours.p99 / raw.p99,
            ours.p50 / rsl.p50,
            ours.p99 / rsl.p99
        );
        if pair.n == common::SERVERS {
            healthy_n5 = Some(ours);
        }
    }
    println!("(µs; o = ours, rsl = rslock)");

    // 2. Throughput.
    println!(
        "\nuncontended throughput at N = {}, cycles/s (median of {ROUNDS} interleaved rounds)",
        common::SERVERS
    );
    println!(
        "{:<6} {:>10} {:>10} {:>10} | {:>10} {:>10}",
        "tasks", "raw", "ours", "rslock", "ours/raw", "ours/rsl"
    );
    for tasks in TASKS {
        let per_round = if smoke {
            tasks as u64 * 2
        } else {
            round_cycles(tasks, cycles)
        };
        let pair = Arc::clone(&pairs[n5]);
        let [raw, ours, rsl] = runtime
            .block_on(runtime.spawn(async move { throughput(&pair, tasks, per_round).await }))
            .expect("the throughput task panicked");
        println!(
            "{:<6} {:>10.0} {:>10.0} {:>10.0} | {:>10.3} {:>10.3}",
            tasks,
            raw,
            ours,
            rsl,
            ours / raw,
            ours / rsl
        );
    }

    // 3. One instance paused: the raw floor would wait for it forever.
    cluster.pause(PAUSED).expect("SIGSTOP instance 4");
    let pair = Arc::clone(&pairs[n5]);
    let rslock_cycles = if smoke { 1 } else { RSLOCK_PAUSED_CYCLES };
    // A panic in the task is caught by its join handle, so the resume runs anyway.
    let paused = runtime.block_on(runtime.spawn(async move {
        let ours = timed(&pair, Side::Ours, cycles, warm_up).await;
        let rslock = timed(&pair, Side::Rslock, rslock_cycles, 0).await;
        (ours, rslock)
    }));
    cluster.resume(PAUSED).expect("SIGCONT instance 4");
    let (paused, rslock_paused) = paused.expect("the paused-instance task panicked");
    let healthy = healthy_n5.expect("N = 5 was measured");
    println!("\nN = 5 with instance {PAUSED} stopped (SIGSTOP), acquire + release:");
    println!(
        "  ours    p50 {:>9.1} µs ({:.3}× healthy {:.1}), p99 {:>9.1} µs ({:.3}× healthy {:.1}); {cycles} cycles",
        paused.p50,
        paused.p50 / healthy.p50,
        healthy.p50,
        paused.p99,
        paused.p99 / healthy.p99,
        healthy.p99
    );
    println!(
        "  rslock  p50 {:>9.1} µs, max {:>9.1} µs; {rslock_cycles} cycles",
        rslock_paused.p50, rslock_paused.p99
    );
    settle(&runtime, &pairs);

    // 4. A majority paused: how long until an error.
    for i in MAJORITY {
        cluster.pause(i).expect("SIGSTOP");
    }
    let pair = Arc::clone(&pairs[n5]);
    let outcomes = runtime.block_on(runtime.spawn(async move { majority_paused(&pair).await }));
    for i in MAJORITY {
        cluster.resume(i).expect("SIGCONT");
    }
    println!("\nN = 5 with instances {MAJORITY:?} stopped: time to an error");
    for (what, elapsed, outcome) in outcomes.expect("the majority-paused task panicked") {
        println!(
            "  {what:<34} {:>8.1} ms  {outcome}",
            elapsed.as_secs_f64() * 1e3
        );
    }
    settle(&runtime, &pairs);
}

/// `CYCLES` if set; else the default under `cargo bench` (which passes
/// `--bench`), or a smoke test's few cycles otherwise (e.g. `cargo test --benches`).
fn cycles() -> usize {
    match std::env::var("CYCLES") {
        Ok(value) => value
            .trim()
            .parse()
            .ok()
            .filter(|&cycles| cycles > 0)
            .expect("CYCLES must be a positive integer"),
        Err(_) if std::env::args().any(|arg| arg == "--bench") => DEFAULT_CYCLES,
        Err(_) => {
            println!("smoke test only; run `cargo bench --bench cycle` for real numbers");
            SMOKE_CYCLES
        }
    }
}

/// Cycles per throughput round: about 0.1–0.2 s of work at the default.
fn round_cycles(tasks: usize, cycles: usize) -> u64 {
    let base = if tasks == 1 { 300 } else { 2_000 };
    (base * cycles / DEFAULT_CYCLES).max(tasks) as u64
}

/// Times raw, ours and rslock on `pair`, `cycles` each, in blocks of [`BLOCK`];
/// each round starts with the next side.
async fn latency(pair: &Pair, cycles: usize, warm_up: usize) -> [Percentiles; 3] {
    for side in Side::ALL {
        for _ in 0..warm_up {
            pair.cycle(side).await;
        }
    }
    let mut samples: [Vec<Duration>; 3] = std::array::from_fn(|_| Vec::with_capacity(cycles));
    let mut remaining = cycles;
    let mut round = 0;
    while remaining > 0 {
        let count = remaining.min(BLOCK);
        for turn in 0..Side::ALL.len() {
            let index = (round + turn) % Side::ALL.len();
            for _ in 0..count {
                let elapsed = pair.timed_cycle(Side::ALL[index]).await;
                samples[index].push(elapsed);
            }
        }
        remaining -= count;
        round += 1;
    }
    samples.map(percentiles)
}

/// Times `side` alone on `pair`.
async fn timed(pair: &Pair, side: Side, cycles: usize, warm_up: usize) -> Percentiles {
    for _ in 0..warm_up {
        pair.cycle(side).await;
    }
    let mut samples = Vec::with_capacity(cycles);
    for _ in 0..cycles {
        samples.push(pair.timed_cycle(side).await);
    }
    percentiles(samples)
}

/// Cycles per second of raw, ours and rslock from `tasks` tasks: the median of
/// [`ROUNDS`] rounds of `per_round` cycles, the sides taking turns.
async fn throughput(pair: &Arc<Pair>, tasks: usize, per_round: u64) -> [f64; 3] {
    for side in Side::ALL {
        common::concurrent(pair, side, tasks, per_round / 4 + 1).await;
    }
    let mut rates: [Vec<f64>; 3] = Default::default();
    for round in 0..ROUNDS {
        for turn in 0..Side::ALL.len() {
            let index = (round + turn) % Side::ALL.len();
            let elapsed = common::concurrent(pair, Side::ALL[index], tasks, per_round).await;
            rates[index].push(per_round as f64 / elapsed.as_secs_f64());
        }
    }
    rates.map(common::median)
}

/// Each client's time to an error with a majority stopped.
async fn majority_paused(pair: &Pair) -> Vec<(&'static str, Duration, String)> {
    let mut outcomes = Vec::new();
    let describe = |result: quorumlock::Result<quorumlock::Lock>| match result {
        Ok(_) => "acquired (unexpected)".to_string(),
        Err(err @ Error::NotAcquired { .. }) => format!(
            "Error::NotAcquired, {} of 5 unreachable",
            err.unreachable_instances()
        ),
        Err(other) => format!("{other}"),
    };

    let started = Instant::now();
    let result = pair
        .ours
        .lock("bench:majority:wait")
        .wait(Duration::from_secs(1))
        .acquire()
        .await;
    outcomes.push((
        "ours acquire, wait 1 s",
        started.elapsed(),
        describe(result),
    ));

    let started = Instant::now();
    let result = pair
        .ours
        .try_acquire("bench:majority:try", common::TTL)
        .await;
    outcomes.push(("ours try_acquire", started.elapsed(), describe(result)));

    let started = Instant::now();
    let result = pair.rslock.lock("bench:majority:rslock", common::TTL).await;
    let outcome = match result {
        Ok(_) => "acquired (unexpected)".to_string(),
        Err(err) => format!("rslock::LockError::{err:?}"),
    };
    outcomes.push((
        "rslock lock (3 attempts, default)",
        started.elapsed(),
        outcome,
    ));
    outcomes
}

/// Waits for our lockers' background work (requests queued for stopped servers).
fn settle(runtime: &tokio::runtime::Runtime, pairs: &[Arc<Pair>]) {
    for pair in pairs {
        let locker = pair.ours.clone();
        let settled = runtime.block_on(async move {
            tokio::time::timeout(SETTLE_TIMEOUT, locker.settle())
                .await
                .is_ok()
        });
        if !settled {
            eprintln!(
                "warning: N = {}: background work still running {SETTLE_TIMEOUT:?} after resuming",
                pair.n
            );
        }
    }
}

fn percentiles(mut samples: Vec<Duration>) -> Percentiles {
    samples.sort_unstable();
    Percentiles {
        p50: common::percentile(&samples, 50),
        p99: common::percentile(&samples, 99),
    }
}
