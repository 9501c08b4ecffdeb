//! Mutual exclusion, seen by the checker, against real servers: a restarted empty
//! instance lets a second owner in unless the restart quarantine keeps it out.

mod common;

use std::time::Duration;

use quorumlock::testing::{Checker, RedisCluster};
use quorumlock::QuorumLocker;
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(5);

/// A holds `job` on instances 0 and 1 of 3 (2 was down); then 0 restarts empty and
/// 2 comes back empty. B, which knew every server before, tries to take `job`
/// while A's lock is valid. Returns the checker's record.
async fn restart_while_held(quarantine: Duration) -> Checker {
    let mut cluster = RedisCluster::start(3).unwrap();
    let a = common::builder(&cluster).build().await.unwrap();
    let b = common::builder(&cluster)
        .restart_quarantine(quarantine)
        .default_wait(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    a.prepare().await.unwrap();
    b.prepare().await.unwrap(); // B learns every run_id
    cluster.kill(2).unwrap();
    let checker = Checker::new();
    let lock = a.acquire("job", TTL).await.unwrap();
    let a_start = Instant::now();
    cluster.restart_empty(0).unwrap();
    cluster.restart_empty(2).unwrap();

    // B retries for a second: long enough for a failed vote to be followed by a
    // probe that sees the new run_ids.
    if let Ok(stolen) = b.acquire("job", TTL).await {
        checker.record("job", 2, Instant::now(), stolen.valid_until());
        std::mem::forget(stolen);
    }
    checker.record("job", 1, a_start, lock.valid_until());
    std::mem::forget(lock);
    checker
}

#[tokio::test]
async fn an_empty_restart_lets_a_second_owner_in_without_quarantine() {
    let checker = restart_while_held(Duration::ZERO).await;
    let violations = checker.violations();
    assert_eq!(violations.len(), 1, "the checker sees the overlap");
    assert!(
        violations[0].overlap() > Duration::from_secs(1),
        "{}",
        violations[0]
    );
}

#[tokio::test]
async fn the_restart_quarantine_keeps_the_second_owner_out() {
    let checker = restart_while_held(TTL).await;
    assert_eq!(checker.len(), 1, "only A held the lock");
    assert!(checker.violations().is_empty());
}

#[tokio::test]
async fn quarantine_is_on_by_default_for_the_default_ttl() {
    let mut cluster = RedisCluster::start(3).unwrap();
    let locker = QuorumLocker::builder()
        .urls(cluster.urls())
        .default_ttl(TTL)
        .build()
        .await
        .unwrap();
    locker.prepare().await.unwrap();
    cluster.restart_empty(1).unwrap();
    // The first vote fails on the broken connection, the probe that follows sees
    // the new run_id.
    let _ = locker.try_acquire("probe", TTL).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let health = locker.health().await;
        if let Some(left) = health.instances()[1].quarantined_for {
            assert!(left <= TTL);
            break;
        }
        assert!(Instant::now() < deadline, "no quarantine: {health}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An idle locker's first request to a restarted server is often its own probe:
/// the failed probe must keep the server from voting until a probe sees its new
/// run_id, or its empty keyspace grants a held lock.
#[tokio::test]
async fn an_idle_locker_notices_a_restart_through_its_probe() {
    let mut cluster = RedisCluster::start(3).unwrap();
    let a = common::builder(&cluster).build().await.unwrap();
    let b = common::builder(&cluster)
        .restart_quarantine(Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    b.prepare().await.unwrap(); // B knows every run_id
    let held = a.acquire("job", Duration::from_secs(30)).await.unwrap();
    a.settle().await;
    common::delete(&cluster, 2, "job").await; // A holds on 0 and 1 only
    cluster.restart_empty(0).unwrap();
    // B stays idle past a probe interval: its probe meets the broken connection.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let stolen = b.try_acquire("job", Duration::from_secs(30)).await;
    assert!(stolen.is_err(), "a second owner got in: {stolen:?}");
    std::mem::forget(held);
}
