//! The counting semaphore against real redis-server processes: permits,
//! `available()`, bad input, and the invariant — at most K holders at any
//! instant — checked through kills, pauses and restarts of the instances, at
//! the defaults, with fresh lockers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quorumlock::testing::{Checker, RedisCluster};
use quorumlock::{Error, QuorumLocker, MAX_PERMITS};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(10);

async fn locker(cluster: &RedisCluster) -> QuorumLocker {
    QuorumLocker::builder()
        .urls(cluster.urls())
        .build()
        .await
        .unwrap()
}

#[tokio::test]
async fn permits_are_counted_and_returned() {
    let cluster = RedisCluster::start(3).unwrap();
    let locker = locker(&cluster).await;
    locker.prepare().await.unwrap();
    let uploads = locker.semaphore("uploads", 3).ttl(TTL);
    assert_eq!(uploads.available().await.unwrap(), 3);
    let mut permits = Vec::new();
    for _ in 0..3 {
        permits.push(uploads.try_acquire().await.unwrap());
    }
    let mut slots: Vec<usize> = permits.iter().map(|permit| permit.slot()).collect();
    slots.sort_unstable();
    assert_eq!(slots, [0, 1, 2]);
    match uploads.try_acquire().await {
        Err(Error::NotAcquired { key, .. }) => assert_eq!(key, "uploads"),
        other => panic!("{other:?}"),
    }
    assert_eq!(uploads.available().await.unwrap(), 0);
    // A waiter gets the permit released meanwhile.
    let waiter = {
        let uploads = uploads.clone().wait(Duration::from_secs(5));
        tokio::spawn(async move { uploads.acquire().await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let freed = permits.pop().unwrap();
    let slot = freed.slot();
    freed.release().await.unwrap();
    let next = waiter.await.unwrap().unwrap();
    assert_eq!(next.slot(), slot);
    permits.push(next);
    permits[0].extend(TTL).await.unwrap();
    let done = locker
        .semaphore("uploads", 4)
        .with_permit(|status| async move { status.key().to_string() })
        .await
        .unwrap();
    assert_eq!(
        done, "uploads:permit:3",
        "the one slot a client of 4 has beyond 3"
    );
    for permit in permits {
        permit.release().await.unwrap();
    }
    assert_eq!(uploads.available().await.unwrap(), 3);
    locker.settle().await;
    let left = cluster.keys_everywhere("uploads*").await.unwrap();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn bad_semaphores_are_refused_before_any_io() {
    let cluster = RedisCluster::start(1).unwrap();
    let locker = locker(&cluster).await;
    for permits in [0, MAX_PERMITS + 1] {
        match locker.semaphore("jobs", permits).try_acquire().await {
            Err(Error::InvalidConfig { setting, .. }) => assert_eq!(setting, "permits"),
            other => panic!("{permits}: {other:?}"),
        }
    }
    assert!(matches!(
        locker.semaphore("", 2).acquire().await,
        Err(Error::EmptyKey)
    ));
    assert!(matches!(
        locker
            .semaphore("jobs", 2)
            .ttl(Duration::ZERO)
            .try_acquire()
            .await,
        Err(Error::InvalidTtl { .. })
    ));
}

/// Eight fresh lockers at the defaults share a semaphore of 3 permits on 5
/// servers while two are killed, one paused and one restarted empty: never
/// more than 3 holders at once, and the semaphore fills up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_than_k_holders_through_faults() {
    const K: usize = 3;
    let mut cluster = RedisCluster::start(5).unwrap();
    let checker = Checker::new();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for worker in 0..8 {
        let urls = cluster.urls();
        let (checker, stop) = (checker.clone(), Arc::clone(&stop));
        workers.push(tokio::spawn(async move {
            let locker = QuorumLocker::builder().urls(urls).build().await.unwrap();
            let semaphore = locker
                .semaphore("render", K)
                .ttl(Duration::from_millis(800))
                .wait(Duration::from_millis(300));
            let mut held = 0;
            for _ in 0..5_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(permit) = semaphore.acquire().await else {
                    continue;
                };
                let start = Instant::now();
                tokio::time::sleep(Duration::from_millis(10)).await;
                let end = Instant::now().min(permit.valid_until());
                checker.record("render", worker, start, end);
                let _ = permit.release().await;
                held += 1;
            }
            locker.settle().await;
            held
        }));
    }
    let faults = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(800));
        cluster.kill(0).unwrap();
        std::thread::sleep(Duration::from_millis(800));
        cluster.pause(1).unwrap();
        std::thread::sleep(Duration::from_millis(800));
        cluster.resume(1).unwrap();
        cluster.restart_empty(2).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        cluster
    });
    let cluster = faults.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for worker in workers {
        total += worker.await.unwrap();
    }
    let excess = checker.over_capacity("render", K);
    assert!(excess.is_empty(), "{:?}", excess.first());
    let most = checker.most_at_once("render");
    eprintln!("{total} permits held, at most {most} at once");
    assert_eq!(most, K, "the run never filled the semaphore");
    let left = cluster.keys_everywhere("render*").await.unwrap();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn qlock_runs_at_most_k_commands_at_once() {
    let cluster = RedisCluster::start(3).unwrap();
    let qlock_with = |permits: &str, extra: &[&str]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_qlock"));
        command
            .env("QLOCK_REDIS_URLS", cluster.urls().join(","))
            .env_remove("QLOCK_KEY_PREFIX")
            .args([
                "run",
                "--key",
                "batch",
                "--semaphore",
                permits,
                "--wait",
                "0s",
            ])
            .args(extra);
        command
    };
    let qlock = |extra: &[&str]| qlock_with("2", extra);
    // Two long holders take both permits; a third finds none.
    let mut holders: Vec<_> = (0..2)
        .map(|_| qlock(&["--", "sleep", "4"]).spawn().unwrap())
        .collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let full = runtime.block_on(async {
        let locker = locker(&cluster).await;
        let semaphore = locker.semaphore("batch", 2);
        for _ in 0..200 {
            if semaphore.available().await.unwrap() == 0 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    });
    assert!(full, "the two holders never held both permits");
    let third = qlock(&["--", "true"]).output().unwrap();
    assert_eq!(third.status.code(), Some(75), "{third:?}");
    assert!(
        String::from_utf8_lossy(&third.stderr).contains("no permit of semaphore \"batch\""),
        "{third:?}"
    );
    for holder in &mut holders {
        assert!(holder.wait().unwrap().success());
    }
    let output = qlock(&["--", "true"]).output().unwrap();
    assert!(output.status.success(), "{output:?}");
    let bad = qlock_with("0", &["--", "true"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--semaphore"),
        "{bad:?}"
    );
}

/// The retry policy bounds the passes: with two attempts allowed, a full
/// semaphore is given up after two passes, well inside the wait.
#[tokio::test]
async fn the_retry_policy_counts_passes() {
    use quorumlock::{MemoryInstance, RetryPolicy};

    let redis = MemoryInstance::new("redis");
    let locker = QuorumLocker::builder()
        .memory(&redis)
        .build()
        .await
        .unwrap();
    let held = locker.semaphore("jobs", 1).try_acquire().await.unwrap();
    let waiting = locker
        .semaphore("jobs", 1)
        .wait(Duration::from_secs(30))
        .retry(RetryPolicy::fixed(Duration::from_millis(1)).with_max_attempts(2));
    match waiting.acquire().await {
        Err(Error::NotAcquired { key, attempts, .. }) => {
            assert_eq!(key, "jobs");
            assert_eq!(attempts, 2);
        }
        other => panic!("{other:?}"),
    }
    held.release().await.unwrap();
}
