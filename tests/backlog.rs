//! Background work under a stalled instance stays bounded. One of three
//! instances answers only after 60 s (through the fault proxy); every cycle's
//! set and delete to it used to wait in the background for that answer, so
//! memory grew with the number of cycles and `settle` never finished. An
//! instance with `MAX_IN_FLIGHT` requests out is no longer asked, and releases
//! go only where the acquire went. Alone in its binary: it reads the process's
//! resident memory.

use std::time::Duration;

use quorumlock::testing::{Direction, FaultProxy, RedisCluster};
use quorumlock::{Quarantine, QuorumLocker, Vote};
use tokio::time::Instant;

const CYCLES: usize = 20_000;
const TTL: Duration = Duration::from_secs(10);

/// Resident memory of this process, in bytes (Linux).
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_instance_does_not_collect_background_work() {
    let cluster = RedisCluster::start(3).expect("start redis-servers");
    let proxy = FaultProxy::start(cluster.server(2).addr())
        .await
        .expect("start proxy");
    let mut urls = cluster.urls();
    urls[2] = proxy.url();
    let locker = QuorumLocker::builder().urls(urls).build().await.unwrap();
    locker.prepare().await.unwrap();
    proxy.set_latency(Direction::ToClient, Duration::from_secs(60));

    // Warm the allocator and the connections before the baseline.
    for _ in 0..200 {
        locker
            .acquire("job", TTL)
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
    }
    let before = rss();
    let started = Instant::now();
    let mut refused_for_backlog = false;
    for cycle in 0..CYCLES {
        let lock = locker.acquire("job", TTL).await.unwrap();
        lock.release().await.unwrap();
        if cycle % 1000 == 999 && !refused_for_backlog {
            // The stalled instance's vote in an attempt on a held key.
            let held = locker.acquire("held", TTL).await.unwrap();
            let rival = locker.try_acquire("held", TTL).await.unwrap_err();
            refused_for_backlog = matches!(
                rival.causes()[2].vote,
                Vote::Quarantined(Quarantine::Backlog { .. })
            );
            held.release().await.unwrap();
        }
    }
    let grown = rss().saturating_sub(before);
    eprintln!(
        "{CYCLES} cycles in {:?} with one instance answering after 60 s: resident memory grew {:.1} MiB",
        started.elapsed(),
        grown as f64 / (1 << 20) as f64
    );
    assert!(refused_for_backlog, "the stalled instance was still asked");
    assert!(
        grown < 24 << 20,
        "resident memory grew {} MiB over {CYCLES} cycles",
        grown >> 20
    );

    // Once it answers again, background work ends: within the TTL it waits at most.
    proxy.set_latency(Direction::ToClient, Duration::ZERO);
    tokio::time::timeout(TTL * 2, locker.settle())
        .await
        .expect("settle finished");
}
