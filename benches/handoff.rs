//! Hand-off latency: from the moment holder A starts releasing a contended lock
//! to the moment waiter B's `acquire` returns it, on one monotonic clock, with
//! and without `wake_waiters`, for 2, 8 and 32 contenders over N = 5 local
//! servers. Each contender has its own locker (as separate processes would) and
//! loops: acquire, hold 1 ms, release. Also the worst single wait of any
//! contender (from asking to getting), the fairness figure. A release followed
//! by the releaser's own next acquisition is not a hand-off: it is counted
//! apart ("kept by releaser").
//!
//! `cargo bench --bench handoff`; `HANDOFF_SECS=20` runs each case longer (the
//! default, 4 s per case, keeps the whole run under a minute).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use quorumlock::testing::RedisCluster;
use quorumlock::QuorumLocker;
use tokio::time::Instant;

const SERVERS: usize = 5;
const CONTENDERS: [usize; 3] = [2, 8, 32];
const HOLD: Duration = Duration::from_millis(1);
const TTL: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Record {
    /// Who holds it, and when they started releasing it, if they have.
    released_at: Option<(usize, Instant)>,
    /// Acquisitions by the contender that had just released it.
    kept: usize,
    handoffs: Vec<Duration>,
    waits: Vec<Duration>,
}

async fn run_case(urls: &[String], wake: bool, contenders: usize, run: Duration) -> Record {
    let mut lockers = Vec::new();
    for _ in 0..contenders {
        let locker = QuorumLocker::builder()
            .urls(urls.iter().cloned())
            .wake_waiters(wake)
            .instance_timeout(Duration::from_millis(200))
            .default_wait(Duration::from_secs(60))
            .build()
            .await
            .expect("build locker");
        locker.prepare().await.expect("prepare");
        lockers.push(locker);
    }
    let key = format!("handoff-{wake}-{contenders}");
    let record = Arc::new(Mutex::new(Record::default()));
    let end = Instant::now() + run;
    let tasks: Vec<_> = lockers
        .into_iter()
        .enumerate()
        .map(|(me, locker)| {
            let (record, key) = (Arc::clone(&record), key.clone());
            tokio::spawn(async move {
                while Instant::now() < end {
                    let asked = Instant::now();
                    let lock = locker.acquire(&key, TTL).await.expect("acquire");
                    let got = Instant::now();
                    {
                        let mut record = record.lock().unwrap();
                        match record.released_at.take() {
                            Some((holder, released)) if holder != me => {
                                record.handoffs.push(got - released);
                            }
                            Some(_) => record.kept += 1,
                            None => {}
                        }
                        record.waits.push(got - asked);
                    }
                    tokio::time::sleep(HOLD).await;
                    record.lock().unwrap().released_at = Some((me, Instant::now()));
                    lock.release().await.expect("release");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("contender");
    }
    Arc::try_unwrap(record)
        .ok()
        .expect("tasks done")
        .into_inner()
        .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let secs: u64 = std::env::var("HANDOFF_SECS")
        .ok()
        .and_then(|secs| secs.parse().ok())
        .unwrap_or(4);
    let run = Duration::from_secs(secs);
    let cluster = RedisCluster::start(SERVERS).expect("start redis-server");
    let urls = cluster.urls();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "hand-off latency, N = {SERVERS} local servers, {secs} s per case, hold {} ms, default retry (50-150 ms)",
        HOLD.as_millis()
    );
    println!("| wake-up | contenders | hand-offs | kept by releaser | p50 ms | p99 ms | max ms | worst wait ms |");
    println!("|---|---|---|---|---|---|---|---|");
    for wake in [false, true] {
        for contenders in CONTENDERS {
            let record = runtime.block_on(run_case(&urls, wake, contenders, run));
            let mut handoffs = record.handoffs;
            handoffs.sort_unstable();
            let worst = record.waits.iter().max().copied().unwrap_or_default();
            println!(
                "| {} | {contenders} | {} | {} | {} | {} | {} | {} |",
                if wake { "on" } else { "off" },
                handoffs.len(),
                record.kept,
                ms(percentile(&handoffs, 0.5)),
                ms(percentile(&handoffs, 0.99)),
                ms(handoffs.last().copied().unwrap_or_default()),
                ms(worst),
            );
        }
    }
}
