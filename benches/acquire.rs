//! Criterion benches of acquire + release against the raw floor and rslock,
//! with HTML reports (`target/criterion/report/index.html`).
//!
//! On one local 5-server cluster (N = 1, 3, 5 use its first N servers):
//!
//! - `cycle/1`, `cycle/3`, `cycle/5`: one cycle from one task — `raw_floor` (N
//!   parallel `SET NX PX`, then N parallel `EVALSHA` compare-and-delete, waiting
//!   for every reply), `quorumlock` (`acquire` + `release`) and `rslock` (`lock` +
//!   `unlock`);
//! - `throughput/1`, `throughput/16`, `throughput/64`: the same three at N = 5
//!   from that many concurrent tasks on distinct keys, reported in cycles/s;
//! - `paused/5`: N = 5 with instance 4 stopped (`SIGSTOP`) — `quorumlock_healthy`
//!   (before the pause), `quorumlock_paused`, and `rslock_paused` (about 1 s per
//!   cycle, so 10 samples of one cycle). The raw floor would wait forever.
//!
//! Run with `cargo bench --bench acquire` (about two minutes), or
//! `cargo bench --bench acquire -- --quick` (a few seconds per bench); filter as
//! usual, e.g. `cargo bench --bench acquire -- cycle/5`. For percentiles and
//! ratios measured interleaved, see `benches/cycle.rs`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Pair, Side};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};

/// Concurrent tasks of the throughput groups.
const TASKS: [usize; 3] = [1, 16, 64];

/// The instance stopped in `paused/5`.
const PAUSED: usize = 4;

fn benches(c: &mut Criterion) {
    let mut cluster = common::start_cluster();
    let runtime = common::runtime();
    let pairs: Vec<Arc<Pair>> = runtime
        .block_on(common::pairs(&cluster))
        .into_iter()
        .map(Arc::new)
        .collect();

    for pair in &pairs {
        let mut group = c.benchmark_group(format!("cycle/{}", pair.n));
        group
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        for side in Side::ALL {
            group.bench_function(side.name(), |b| {
                b.to_async(&runtime).iter(|| pair.cycle(side));
            });
        }
        group.finish();
    }

    let n5 = pairs
        .iter()
        .find(|pair| pair.n == common::SERVERS)
        .expect("N = 5 is among the sizes");
    for tasks in TASKS {
        let mut group = c.benchmark_group(format!("throughput/{tasks}"));
        group
            .throughput(Throughput::Elements(1))
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .sample_size(30);
        for side in Side::ALL {
            group.bench_function(side.name(), |b| {
                // `iters` cycles from `tasks` tasks: time per cycle, so cycles/s.
                b.to_async(&runtime)
                    .iter_custom(|iters| common::concurrent(n5, side, tasks, iters));
            });
        }
        group.finish();
    }

    let mut group = c.benchmark_group(format!("paused/{}", common::SERVERS));
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    group.bench_function("quorumlock_healthy", |b| {
        b.to_async(&runtime).iter(|| n5.cycle(Side::Ours));
    });
    cluster.pause(PAUSED).expect("SIGSTOP instance 4");
    group.bench_function("quorumlock_paused", |b| {
        b.to_async(&runtime).iter(|| n5.cycle(Side::Ours));
    });
    // About a second per cycle: criterion warns that 10 samples take longer than
    // the target time, and takes them anyway.
    group.bench_function("rslock_paused", |b| {
        b.to_async(&runtime).iter(|| n5.cycle(Side::Rslock));
    });
    group.finish();
    cluster.resume(PAUSED).expect("SIGCONT instance 4");

    // Background work (replies from instances beyond the quorum, requests queued
    // for the stopped one) ends before the servers do.
    runtime.block_on(async {
        for pair in &pairs {
            let settled = tokio::time::timeout(Duration::from_secs(30), pair.ours.settle()).await;
            if settled.is_err() {
                eprintln!("warning: N = {}: background work still running", pair.n);
            }
        }
    });
}

criterion_group!(all, benches);
criterion_main!(all);
