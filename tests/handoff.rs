//! Hand-off to waiters through pub/sub, against real servers: a waiter is woken
//! long before its (deliberately slow) timed retry, and when the wake-up path
//! fails — a lost message, a killed subscription connection, a connection the
//! locker cannot subscribe through — the timed retry still gets the lock.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::cluster;
use quorumlock::testing::RedisCluster;
use quorumlock::{Builder, MemoryInstance, QuorumLocker, RetryPolicy};
use tokio::time::{timeout, Instant};

const KEY: &str = "report";
const TTL: Duration = Duration::from_secs(30);

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

fn waking(cluster: &RedisCluster, fallback: Duration) -> Builder {
    common::builder(cluster)
        .instance_timeout(ms(500))
        .wake_waiters(true)
        .retry(RetryPolicy::fixed(fallback))
        .default_wait(Duration::from_secs(30))
}

/// Spawns a wait for `KEY` on `locker`; resolves to when it got the lock.
fn wait_for(locker: &QuorumLocker) -> tokio::task::JoinHandle<Instant> {
    let locker = locker.clone();
    tokio::spawn(async move {
        let lock = locker.acquire(KEY, TTL).await.expect("acquire");
        let at = Instant::now();
        lock.release().await.expect("release");
        at
    })
}

/// Holds the lock with `holder`, lets `waiter` start waiting, releases, and
/// returns how long the waiter took after the release.
async fn hand_off(holder: &QuorumLocker, waiter: &QuorumLocker, settle: Duration) -> Duration {
    let held = holder.acquire(KEY, TTL).await.unwrap();
    let waiting = wait_for(waiter);
    tokio::time::sleep(settle).await;
    assert!(!waiting.is_finished());
    let released = Instant::now();
    held.release().await.unwrap();
    let acquired = timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the waiter never got the lock")
        .unwrap();
    acquired.duration_since(released)
}

#[tokio::test]
async fn a_waiter_is_woken_long_before_its_fallback_retry() {
    for n in [3, 5] {
        let cluster = cluster(n);
        let holder = waking(&cluster, Duration::from_secs(5))
            .build()
            .await
            .unwrap();
        let waiter = waking(&cluster, Duration::from_secs(5))
            .build()
            .await
            .unwrap();
        // The first wait subscribes (and re-checks once subscribed); the second
        // reuses the subscription.
        for round in 0..2 {
            let took = hand_off(&holder, &waiter, ms(300)).await;
            assert!(
                took < ms(500),
                "N = {n}, round {round}: the waiter took {took:?} after the release, not woken"
            );
        }
        // Waits of the same locker are woken too.
        let took = hand_off(&waiter, &waiter, ms(300)).await;
        assert!(took < ms(500), "same locker: {took:?}");
    }
}

/// A release by a locker that does not publish is a lost message: the timed
/// retry still gets the lock, after about its delay.
#[tokio::test]
async fn a_lost_message_costs_only_the_fallback_delay() {
    let cluster = cluster(3);
    let silent = common::builder(&cluster).build().await.unwrap();
    let waiter = waking(&cluster, ms(700)).build().await.unwrap();
    let took = hand_off(&silent, &waiter, ms(300)).await;
    assert!(took < ms(3000), "{took:?}");
    // And a lock that just expires publishes nothing either.
    let lost = silent.acquire(KEY, ms(400)).await.unwrap();
    std::mem::forget(lost);
    let start = Instant::now();
    let acquired = timeout(Duration::from_secs(10), wait_for(&waiter))
        .await
        .expect("never acquired after the expiry")
        .unwrap();
    assert!(acquired.duration_since(start) >= ms(300));
}

/// The subscription connections die mid-wait: the waiter still gets the lock
/// (the reconnection re-checks, and the timed retry is there anyway), and once
/// reconnected, wake-ups work again.
#[tokio::test]
async fn a_killed_subscription_connection_still_acquires() {
    let cluster = cluster(3);
    let holder = waking(&cluster, Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let waiter = waking(&cluster, Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let held = holder.acquire(KEY, TTL).await.unwrap();
    let waiting = wait_for(&waiter);
    tokio::time::sleep(ms(300)).await;
    for i in 0..cluster.len() {
        let mut connection = cluster.connection(i).await.unwrap();
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut connection)
            .await
            .unwrap();
        assert!(
            killed >= 1,
            "instance {i}: no subscription connection to kill"
        );
    }
    held.release().await.unwrap();
    timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiter never got the lock")
        .unwrap();

    // Reconnected: the next hand-off is woken again.
    tokio::time::sleep(ms(500)).await;
    let took = hand_off(&holder, &waiter, ms(300)).await;
    assert!(took < ms(500), "{took:?}");
}

/// Connections made by the caller cannot be subscribed through: waits fall back
/// to the timed retry, silently.
#[tokio::test]
async fn user_connections_fall_back_to_timed_retries() {
    let cluster = cluster(1);
    let client = redis::Client::open(cluster.urls()[0].as_str()).unwrap();
    let connection = client.get_multiplexed_async_connection().await.unwrap();
    let locker = QuorumLocker::builder()
        .connection("mine", connection)
        .wake_waiters(true)
        .retry(RetryPolicy::fixed(ms(200)))
        .build()
        .await
        .unwrap();
    let took = hand_off(&locker, &locker, ms(100)).await;
    assert!(took < ms(2000), "{took:?}");
}

/// Memory instances deliver release messages in process.
#[tokio::test]
async fn memory_instances_wake_waiters() {
    let instances: Vec<_> = (0..3)
        .map(|i| MemoryInstance::new(format!("m{i}")))
        .collect();
    let locker = instances
        .iter()
        .fold(QuorumLocker::builder(), |builder, instance| {
            builder.memory(instance)
        })
        .wake_waiters(true)
        .retry(RetryPolicy::fixed(Duration::from_secs(5)))
        .build()
        .await
        .unwrap();
    let took = hand_off(&locker, &locker, ms(100)).await;
    assert!(took < ms(500), "{took:?}");
}

/// Steady contention: every contender keeps taking the lock, holding it a
/// moment and coming back. Nobody is starved: each gets the lock, and the
/// worst single wait stays far below the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_waiter_is_starved_under_steady_contention() {
    let cluster = cluster(3);
    let mut lockers = Vec::new();
    for _ in 0..2 {
        lockers.push(waking(&cluster, ms(100)).build().await.unwrap());
    }
    let contenders = 8;
    let end = Instant::now() + Duration::from_secs(3);
    let waits = Arc::new(Mutex::new(vec![Vec::new(); contenders]));
    let mut tasks = Vec::new();
    for contender in 0..contenders {
        let locker = lockers[contender % 2].clone();
        let waits = Arc::clone(&waits);
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                let asked = Instant::now();
                let lock = locker.acquire(KEY, TTL).await.expect("acquire");
                waits.lock().unwrap()[contender].push(asked.elapsed());
                tokio::time::sleep(ms(5)).await;
                lock.release().await.expect("release");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let waits = waits.lock().unwrap();
    let worst = waits.iter().flatten().max().copied().unwrap();
    for (contender, own) in waits.iter().enumerate() {
        assert!(!own.is_empty(), "contender {contender} never got the lock");
    }
    assert!(worst < Duration::from_millis(2500), "worst wait {worst:?}");
}
