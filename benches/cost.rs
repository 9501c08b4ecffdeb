//! Heap allocations, bytes allocated and (under callgrind) instructions per
//! acquire + release cycle at N = 5: ours against the raw floor (waits for
//! every reply), the quorum floor (decided at the quorum-th) and rslock.
//!
//! A counting global allocator counts every `alloc`, `alloc_zeroed` and
//! `realloc` (a `realloc` counts as one allocation of its new size) while
//! `measure` runs: the timed cycles and then `settle`, so the background work a
//! cycle leaves (replies beyond the quorum) is included. Everything runs on one
//! current-thread Tokio runtime, the redis-rs connection tasks included, so the
//! counts are this process's whole cost per cycle. Our locker probes its
//! instances (`INFO`, `TIME`) every second whatever the load, and each attempt
//! reads the clock rates estimated from those probes: to count the steady state
//! of an attempt (rates known) without counting much probing, the locker here
//! probes every 5 s, and measuring starts after the second probe.
//!
//! - `cargo bench --bench cost`: allocations and bytes per cycle (a few seconds).
//! - `cargo bench --bench cost -- --callgrind`: also instructions per cycle,
//!   running this program under `valgrind --tool=callgrind` once per side with
//!   collection only inside `measure` (`--toggle-collect`); the outputs are left
//!   in `target/cost/` for `callgrind_annotate`.
//!
//! Options: `--side raw|quorum|ours|rslock` (one side only), `--cycles N` (default
//! 2000; 300 per side under callgrind).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{Pair, QuorumFloor, RawFloor, Side};
use quorumlock::QuorumLocker;

/// Counts allocations and their bytes, then defers to the system allocator.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

fn count(size: usize) {
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    BYTES.fetch_add(size as u64, Ordering::Relaxed);
}

// SAFETY: every method forwards its arguments unchanged to `System`, which
// upholds the `GlobalAlloc` contract; the counting touches only atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Cycles per side unless `--cycles` says otherwise.
const DEFAULT_CYCLES: u64 = 2_000;

/// Cycles per side under callgrind (about 50 times slower).
const CALLGRIND_CYCLES: u64 = 300;

/// Untimed cycles per side first: connections, scripts, first-use allocations.
const WARM_UP: u64 = 200;

/// What one side cost per cycle.
struct Cost {
    allocations: f64,
    bytes: f64,
}

struct Options {
    sides: Vec<Side>,
    cycles: Option<u64>,
    callgrind: bool,
}

fn options() -> Options {
    let mut options = Options {
        sides: Side::WITH_QUORUM.to_vec(),
        cycles: None,
        callgrind: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--side" => {
                let side = args
                    .next()
                    .expect("--side needs raw, quorum, ours or rslock");
                let side = Side::WITH_QUORUM
                    .into_iter()
                    .find(|s| s.name().starts_with(side.as_str()))
                    .expect("--side must be raw, quorum, ours (quorumlock) or rslock");
                options.sides = vec![side];
            }
            "--cycles" => {
                let cycles = args.next().and_then(|n| n.parse().ok());
                options.cycles = Some(cycles.expect("--cycles needs a positive integer"));
            }
            "--callgrind" => options.callgrind = true,
            _ => {} // `--bench` and criterion-style filters from `cargo bench`
        }
    }
    options
}

fn main() {
    let options = options();
    let cycles = options.cycles.unwrap_or(DEFAULT_CYCLES);
    let cluster = common::start_cluster();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build the runtime");
    let urls = cluster.urls();
    let pair = runtime.block_on(async {
        Pair {
            n: urls.len(),
            raw: RawFloor::connect(&urls).await,
            quorum: QuorumFloor::connect(&urls).await,
            ours: locker(&urls).await,
            rslock: common::rslock(&urls).await,
        }
    });

    println!(
        "cost per acquire+release cycle, N = {}: {cycles} cycles per side after {WARM_UP} \
         warm-up, current-thread runtime",
        pair.n
    );
    println!(
        "{:<12} {:>14} {:>14}",
        "side", "allocs/cycle", "bytes/cycle"
    );
    let mut costs = Vec::new();
    for &side in &options.sides {
        runtime.block_on(async {
            for _ in 0..WARM_UP {
                pair.cycle(side).await;
            }
            pair.ours.settle().await;
        });
        let cost = measure(&runtime, &pair, side, cycles);
        println!(
            "{:<12} {:>14.1} {:>14.0}",
            side.name(),
            cost.allocations,
            cost.bytes
        );
        costs.push((side, cost));
    }
    let find = |wanted: Side| costs.iter().find(|(side, _)| *side == wanted);
    for floor in [Side::Raw, Side::Quorum] {
        if let (Some((_, ours)), Some((_, base))) = (find(Side::Ours), find(floor)) {
            println!(
                "ours / {}: {:.2}× allocations, {:.2}× bytes",
                floor.name(),
                ours.allocations / base.allocations,
                ours.bytes / base.bytes
            );
        }
    }
    drop(pair);
    drop(cluster);

    if options.callgrind {
        callgrind(&options);
    }
}

/// How often our locker probes here (see the module docs).
const PROBE_EVERY: Duration = Duration::from_secs(5);

/// Our locker over `urls`: defaults, but probes every [`PROBE_EVERY`]; returns
/// once every instance's clock rate is estimated, as in a running service.
async fn locker(urls: &[String]) -> QuorumLocker {
    let locker = QuorumLocker::builder()
        .urls(urls.iter().cloned())
        .probe_every(PROBE_EVERY)
        .build()
        .await
        .expect("build the locker");
    locker.prepare().await.expect("prepare the locker");
    tokio::time::sleep(PROBE_EVERY + Duration::from_millis(500)).await;
    let health = locker.health().await;
    let estimated = health
        .instances()
        .iter()
        .filter(|instance| instance.clock_rate.is_some())
        .count();
    if estimated < urls.len() {
        eprintln!(
            "warning: clock rates estimated for {estimated} of {} instances",
            urls.len()
        );
    }
    locker
}

/// Runs `cycles` cycles of `side` and the background work they leave; the only
/// span callgrind collects in (`--toggle-collect=cost::measure*`).
#[inline(never)]
fn measure(runtime: &tokio::runtime::Runtime, pair: &Pair, side: Side, cycles: u64) -> Cost {
    let allocations = ALLOCATIONS.load(Ordering::Relaxed);
    let bytes = BYTES.load(Ordering::Relaxed);
    runtime.block_on(async {
        for _ in 0..cycles {
            pair.cycle(side).await;
        }
        pair.ours.settle().await;
    });
    Cost {
        allocations: (ALLOCATIONS.load(Ordering::Relaxed) - allocations) as f64 / cycles as f64,
        bytes: (BYTES.load(Ordering::Relaxed) - bytes) as f64 / cycles as f64,
    }
}

/// Runs this program under callgrind once per side and prints instructions per
/// cycle (`Collected` divided by the cycles).
fn callgrind(options: &Options) {
    let cycles = options.cycles.unwrap_or(CALLGRIND_CYCLES);
    let exe = std::env::current_exe().expect("this program's path");
    let out_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/cost");
    std::fs::create_dir_all(&out_dir).expect("create target/cost");
    println!("\ninstructions per cycle under callgrind ({cycles} cycles per side, collected in `measure` only)");
    let mut counts = Vec::new();
    for &side in &options.sides {
        let out = out_dir.join(format!("callgrind.{}.out", side.name()));
        let output = Command::new("valgrind")
            .arg("--tool=callgrind")
            .arg("--toggle-collect=cost::measure*")
            .arg(format!("--callgrind-out-file={}", out.display()))
            .arg(&exe)
            .args(["--side", side.name(), "--cycles", &cycles.to_string()])
            .output();
        let output = match output {
            Ok(output) => output,
            Err(err) => {
                println!("valgrind could not run ({err}); install it for instruction counts");
                return;
            }
        };
        let stderr = String::from_utf8_lossy(&output.stderr);
        let collected = stderr
            .lines()
            .find_map(|line| line.split("Collected :").nth(1))
            .and_then(|n| n.trim().parse::<u64>().ok());
        match collected {
            Some(collected) => {
                let per_cycle = collected as f64 / cycles as f64;
                println!(
                    "{:<12} {:>14.0}   ({})",
                    side.name(),
                    per_cycle,
                    out.display()
                );
                counts.push((side, per_cycle));
            }
            None => println!("{}: no count from callgrind:\n{stderr}", side.name()),
        }
    }
    let find = |wanted: Side| counts.iter().find(|(side, _)| *side == wanted).map(|c| c.1);
    for floor in [Side::Raw, Side::Quorum] {
        if let (Some(ours), Some(base)) = (find(Side::Ours), find(floor)) {
            println!("ours / {}: {:.2}× instructions", floor.name(), ours / base);
        }
    }
}
