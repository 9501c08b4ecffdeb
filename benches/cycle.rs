//! Latency of one acquire + release cycle against the raw floor, as percentiles.
//!
//! For N = 1, 3 and 5 (the first N servers of one local 5-server cluster) this
//! times `locker.acquire(key, 10 s)` + `lock.release()` ("ours") and the raw
//! floor (N parallel `SET NX PX`, then N parallel `EVALSHA` compare-and-delete,
//! waiting for every reply), in interleaved blocks so that machine noise hits
//! both alike, and prints p50 / p99 of each and the ratios ours / raw. A last
//! row times ours at N = 5 with instance 4 stopped by `SIGSTOP` (the raw floor
//! would wait for it forever).
//!
//! Run with `cargo bench --bench cycle`; `CYCLES=20000 cargo bench --bench cycle`
//! takes more samples (default 5000 per side and row). Without `--bench` (as
//! under `cargo test --benches`) and without `CYCLES` it only smoke-tests, with
//! a handful of cycles.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Keys, Pair};

/// Samples per side and row unless `CYCLES` says otherwise.
const DEFAULT_CYCLES: usize = 5_000;

/// Samples per side and row in a smoke test (run without `--bench`).
const SMOKE_CYCLES: usize = 20;

/// Cycles per side before the sides swap.
const BLOCK: usize = 50;

/// At most this many untimed warm-up cycles per side and row.
const MAX_WARM_UP: usize = 500;

/// The instance stopped for the last row.
const PAUSED: usize = 4;

/// How long to wait, after resuming, for the background work of the paused row.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

static RAW_KEYS: Keys = Keys::new("rawf");
static OURS_KEYS: Keys = Keys::new("ours");

#[derive(Clone, Copy)]
enum Side {
    Raw,
    Ours,
}

/// p50 and p99 of one side, in µs.
#[derive(Clone, Copy)]
struct Percentiles {
    p50: f64,
    p99: f64,
}

fn main() {
    let cycles = cycles();
    let warm_up = (cycles / 10).clamp(1, MAX_WARM_UP);

    let mut cluster = common::start_cluster();
    let runtime = common::runtime();
    let pairs = Arc::new(runtime.block_on(common::pairs(&cluster)));

    println!(
        "quorumlock: one acquire+release cycle vs the raw floor\n\
         {cycles} timed cycles per side and row (after {warm_up} warm-up), \
         interleaved in blocks of {BLOCK}; TTL {:?}; tokio multi-thread, 2 workers\n",
        common::TTL
    );
    println!(
        "{:<18} {:>11} {:>11} {:>11} {:>11} {:>13} {:>13}",
        "N",
        "raw p50 µs",
        "raw p99 µs",
        "ours p50 µs",
        "ours p99 µs",
        "p50 ours/raw",
        "p99 ours/raw"
    );

    let mut healthy_n5 = None;
    for index in 0..pairs.len() {
        let shared = Arc::clone(&pairs);
        let task = async move { compare(&shared[index], cycles, warm_up).await };
        let (raw, ours) = runtime
            .block_on(runtime.spawn(task))
            .expect("the measurement task panicked");
        let n = pairs[index].n;
        println!(
            "{:<18} {:>11.1} {:>11.1} {:>11.1} {:>11.1} {:>13.3} {:>13.3}",
            n,
            raw.p50,
            raw.p99,
            ours.p50,
            ours.p99,
            ours.p50 / raw.p50,
            ours.p99 / raw.p99
        );
        if n == common::SERVERS {
            healthy_n5 = Some(ours);
        }
    }

    // Ours only: the raw floor waits for every reply, so it would hang here.
    let n5 = pairs
        .iter()
        .position(|pair| pair.n == common::SERVERS)
        .expect("N = 5 is among the sizes");
    cluster.pause(PAUSED).expect("SIGSTOP instance 4");
    let task = {
        let shared = Arc::clone(&pairs);
        async move { timed_alone(&shared[n5], cycles, warm_up).await }
    };
    // A panic in the task is caught by its join handle, so the resume runs anyway.
    let paused = runtime.block_on(runtime.spawn(task));
    cluster.resume(PAUSED).expect("SIGCONT instance 4");
    let paused = paused.expect("the paused-instance measurement task panicked");
    let healthy = healthy_n5.expect("N = 5 was measured");
    println!(
        "{:<18} {:>11} {:>11} {:>11.1} {:>11.1} {:>13} {:>13}",
        format!("{} (#{PAUSED} stopped)", common::SERVERS),
        "n/a",
        "n/a",
        paused.p50,
        paused.p99,
        "n/a",
        "n/a"
    );
    println!(
        "\nN = 5 with instance {PAUSED} stopped: ours p50 is {:.3}× the healthy N = 5 p50 \
         ({:.1} µs vs {:.1} µs); p99 {:.3}×",
        paused.p50 / healthy.p50,
        paused.p50,
        healthy.p50,
        paused.p99 / healthy.p99
    );

    // The deletes and sets queued for the stopped instance finish in the background.
    let locker = pairs[n5].ours.clone();
    let settled = runtime.block_on(async move {
        tokio::time::timeout(SETTLE_TIMEOUT, locker.settle())
            .await
            .is_ok()
    });
    if !settled {
        eprintln!("warning: background work still running {SETTLE_TIMEOUT:?} after resuming");
    }
}

/// `CYCLES` if set; else the default under `cargo bench` (which passes
/// `--bench`), or a smoke test's few cycles otherwise (e.g. `cargo test --benches`).
/// Other arguments are ignored.
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

/// Times raw and ours on `pair`, `cycles` each, alternating blocks of [`BLOCK`]
/// and which side goes first in each round.
async fn compare(pair: &Pair, cycles: usize, warm_up: usize) -> (Percentiles, Percentiles) {
    run(pair, Side::Raw, warm_up, None).await;
    run(pair, Side::Ours, warm_up, None).await;

    let mut raw = Vec::with_capacity(cycles);
    let mut ours = Vec::with_capacity(cycles);
    let mut remaining = cycles;
    let mut round = 0_usize;
    while remaining > 0 {
        let count = remaining.min(BLOCK);
        if round.is_multiple_of(2) {
            run(pair, Side::Ours, count, Some(&mut ours)).await;
            run(pair, Side::Raw, count, Some(&mut raw)).await;
        } else {
            run(pair, Side::Raw, count, Some(&mut raw)).await;
            run(pair, Side::Ours, count, Some(&mut ours)).await;
        }
        remaining -= count;
        round += 1;
    }
    (percentiles(raw), percentiles(ours))
}

/// Times ours alone on `pair`.
async fn timed_alone(pair: &Pair, cycles: usize, warm_up: usize) -> Percentiles {
    run(pair, Side::Ours, warm_up, None).await;
    let mut ours = Vec::with_capacity(cycles);
    run(pair, Side::Ours, cycles, Some(&mut ours)).await;
    percentiles(ours)
}

/// Runs `count` cycles of `side`, each on a fresh key, pushing each one's
/// duration to `samples` if given.
async fn run(pair: &Pair, side: Side, count: usize, mut samples: Option<&mut Vec<Duration>>) {
    for _ in 0..count {
        // Each key is made before, and dropped after, the timed span.
        let elapsed = match side {
            Side::Raw => {
                let key = RAW_KEYS.next();
                let started = Instant::now();
                pair.raw.cycle(&key).await;
                started.elapsed()
            }
            Side::Ours => {
                let key = OURS_KEYS.next();
                let started = Instant::now();
                common::ours_cycle(&pair.ours, &key).await;
                started.elapsed()
            }
        };
        if let Some(samples) = samples.as_deref_mut() {
            samples.push(elapsed);
        }
    }
}

/// Nearest-rank p50 and p99, in µs.
fn percentiles(mut samples: Vec<Duration>) -> Percentiles {
    assert!(!samples.is_empty(), "no samples");
    samples.sort_unstable();
    // The smallest sample with at least `percent`% of all at or below it.
    let at = |percent: usize| {
        let rank = (percent * samples.len()).div_ceil(100);
        samples[rank.clamp(1, samples.len()) - 1].as_secs_f64() * 1e6
    };
    Percentiles {
        p50: at(50),
        p99: at(99),
    }
}
