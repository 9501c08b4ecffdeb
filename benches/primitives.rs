//! What the primitives beyond the mutex cost per cycle, against the mutex:
//! an acquire and a release on 3 local servers, one task, rounds of the
//! cases interleaved.
//!
//! - the mutex, on a key of its own;
//! - a semaphore of 4 permits, all free: the first slot tried is taken;
//! - the same with 3 of its 4 permits held by another client: a pass tries
//!   slots in a random order until it meets the free one (2.5 tries on
//!   average);
//! - a semaphore of 4 permits all held: a `try_acquire` that finds none
//!   (4 tries).
//!
//! `cargo bench --bench primitives`; `PRIMITIVES_CYCLES` (default 2000) per
//! case and round.

use std::time::Duration;

use quorumlock::testing::RedisCluster;
use quorumlock::QuorumLocker;
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(10);
const ROUNDS: usize = 3;

fn p50(samples: &mut [Duration]) -> Duration {
    samples.sort_unstable();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}

fn main() {
    // Without `--bench` (as under `cargo test --benches`): a smoke test.
    let bench = std::env::args().any(|arg| arg == "--bench");
    let cycles: usize = std::env::var("PRIMITIVES_CYCLES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(if bench { 2000 } else { 20 });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let servers = RedisCluster::start(3).expect("servers");
        let build = || async {
            let locker = QuorumLocker::builder()
                .urls(servers.urls())
                .instance_timeout(Duration::from_millis(500))
                .build()
                .await
                .expect("build");
            locker.prepare().await.expect("prepare");
            locker
        };
        let (ours, other) = (build().await, build().await);
        // Three of the busy semaphore's four permits and all of the full one's,
        // held by the other client for the whole run.
        let busy = other.semaphore("busy", 4).ttl(Duration::from_secs(600));
        let full = other.semaphore("full", 4).ttl(Duration::from_secs(600));
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(busy.try_acquire().await.expect("busy permit"));
        }
        for _ in 0..4 {
            held.push(full.try_acquire().await.expect("full permit"));
        }
        let names = [
            "mutex",
            "semaphore of 4, all free",
            "semaphore of 4, 3 held",
            "semaphore of 4, all held (refused)",
        ];
        let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); names.len()];
        for _ in 0..ROUNDS {
            for (case, sample) in samples.iter_mut().enumerate() {
                for cycle in 0..cycles {
                    let began = Instant::now();
                    match case {
                        0 => {
                            let lock = ours
                                .try_acquire(&format!("mutex-{cycle}"), TTL)
                                .await
                                .expect("lock");
                            lock.release().await.expect("release");
                        }
                        1 => {
                            let permit = ours
                                .semaphore("free", 4)
                                .ttl(TTL)
                                .try_acquire()
                                .await
                                .expect("permit");
                            permit.release().await.expect("release");
                        }
                        2 => {
                            let permit = ours
                                .semaphore("busy", 4)
                                .ttl(TTL)
                                .try_acquire()
                                .await
                                .expect("permit");
                            permit.release().await.expect("release");
                        }
                        _ => {
                            let refused = ours.semaphore("full", 4).ttl(TTL).try_acquire().await;
                            assert!(refused.is_err());
                        }
                    }
                    sample.push(began.elapsed());
                }
            }
        }
        println!(
            "one task, 3 servers, {cycles} cycles per case and round, {ROUNDS} rounds interleaved"
        );
        let floor = p50(&mut samples[0]);
        for (name, sample) in names.iter().zip(&mut samples) {
            let median = p50(sample);
            println!(
                "  {name:<36} p50 {:>7.3} ms  ({:.2}× the mutex)",
                median.as_secs_f64() * 1e3,
                median.as_secs_f64() / floor.as_secs_f64()
            );
        }
        for permit in held {
            permit.release().await.expect("release");
        }
    });
}
