//! Validity at grant and acquire latency with fast server clocks: 5 servers,
//! none, 2 or 3 of them at clock rate 2.0 (the clock shim), one fresh locker at
//! the library's defaults, uncontended `try_acquire` + `release` of distinct
//! keys. Prints one Markdown row per setting for BENCHMARKS.md.
//!
//! `cargo bench --bench validity` (`VALIDITY_CYCLES` sets the cycles per row).

use std::time::{Duration, Instant};

use quorumlock::testing::{RedisCluster, RedisServer};
use quorumlock::QuorumLocker;

const TTL: Duration = Duration::from_millis(300);

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or_default()
}

fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1e3)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing.
    let cycles: usize = std::env::var("VALIDITY_CYCLES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(2000);
    println!("| clocks at 2.0 | validity at grant p50 / min | acquire p50 / p99 | first lock after build |");
    println!("|---|---|---|---|");
    for fast in [0usize, 2, 3] {
        let builders: Vec<_> = (0..5)
            .map(|i| RedisServer::builder().clock_rate(if i < fast { 2.0 } else { 1.0 }))
            .collect();
        let cluster = RedisCluster::start_each(&builders).expect("start 5 redis-servers");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let urls = cluster.urls();
        let (validity, latency, first) = runtime.block_on(async move {
            let built = Instant::now();
            let locker = QuorumLocker::builder().urls(urls).build().await.unwrap();
            let lock = locker.try_acquire("first", TTL).await.unwrap();
            let first = built.elapsed();
            lock.release().await.unwrap();
            // Past the start-up, where the clock bounds are at their loosest.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let mut validity = Vec::with_capacity(cycles);
            let mut latency = Vec::with_capacity(cycles);
            for i in 0..cycles {
                let started = Instant::now();
                let lock = locker.try_acquire(&format!("v{i}"), TTL).await.unwrap();
                latency.push(started.elapsed());
                validity.push(lock.remaining());
                lock.release().await.unwrap();
            }
            locker.settle().await;
            validity.sort_unstable();
            latency.sort_unstable();
            (validity, latency, first)
        });
        println!(
            "| {fast} of 5 | {} / {} | {} / {} | {} |",
            ms(percentile(&validity, 0.5)),
            ms(percentile(&validity, 0.0)),
            ms(percentile(&latency, 0.5)),
            ms(percentile(&latency, 0.99)),
            ms(first),
        );
        drop(cluster);
    }
}
