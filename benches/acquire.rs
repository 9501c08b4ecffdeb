//! Criterion bench of one acquire + release cycle against the raw floor.
//!
//! Groups `cycle/1`, `cycle/3` and `cycle/5` (the first N servers of one local
//! 5-server cluster) each hold `raw_floor` (N parallel `SET NX PX`, then N
//! parallel `EVALSHA` compare-and-delete, waiting for every reply) and
//! `quorumlock` (`acquire` + `release`), so criterion's HTML report
//! (`target/criterion/report/index.html`) shows them side by side.
//!
//! Run with `cargo bench --bench acquire` (about a minute); filter as usual,
//! e.g. `cargo bench --bench acquire -- cycle/5`.

mod common;

use std::time::Duration;

use common::Keys;
use criterion::{criterion_group, criterion_main, Criterion};

static RAW_KEYS: Keys = Keys::new("rawf");
static OURS_KEYS: Keys = Keys::new("ours");

fn cycles(c: &mut Criterion) {
    let cluster = common::start_cluster();
    let runtime = common::runtime();
    let pairs = runtime.block_on(common::pairs(&cluster));

    for pair in &pairs {
        let mut group = c.benchmark_group(format!("cycle/{}", pair.n));
        group
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));

        let raw = &pair.raw;
        group.bench_function("raw_floor", |b| {
            b.to_async(&runtime)
                .iter(|| async move { raw.cycle(&RAW_KEYS.next()).await });
        });
        let ours = &pair.ours;
        group.bench_function("quorumlock", |b| {
            b.to_async(&runtime)
                .iter(|| async move { common::ours_cycle(ours, &OURS_KEYS.next()).await });
        });
        group.finish();
    }

    // Background work (replies from instances beyond the quorum) ends before the
    // servers do.
    runtime.block_on(async {
        for pair in &pairs {
            let settled = tokio::time::timeout(Duration::from_secs(30), pair.ours.settle()).await;
            if settled.is_err() {
                eprintln!("warning: N = {}: background work still running", pair.n);
            }
        }
    });
}

criterion_group!(benches, cycles);
criterion_main!(benches);
