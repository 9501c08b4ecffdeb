//! Redis Cluster members (feature `cluster`) against real local clusters
//! (`testing::ShardedCluster`): every operation on many keys spread over the
//! primaries, a quorum mixing clusters and a single server, and the defences
//! per primary (a restart, a failover, a slot served by another node) that
//! quarantine the member.

use std::time::Duration;

use quorumlock::testing::{RedisServer, ShardedCluster};
use quorumlock::{Error, QuorumLocker};

const TTL: Duration = Duration::from_secs(10);

fn start(primaries: usize, replicas: usize) -> ShardedCluster {
    ShardedCluster::start(primaries, replicas).unwrap_or_else(|e| panic!("cluster: {e}"))
}

/// The key's value on its slot's primary, read straight from the node.
async fn value_on(cluster: &ShardedCluster, key: &str) -> Option<String> {
    let node = cluster.primary_for_key(key).expect("primary");
    let client = redis::Client::open(cluster.node(node).url()).expect("url");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut connection)
        .await
        .expect("GET")
}

/// Keys of every node's data set but the crate's own (epoch hashes, counters).
async fn lock_keys(cluster: &ShardedCluster) -> Vec<String> {
    let mut keys = Vec::new();
    for node in cluster.primaries().expect("primaries") {
        let client = redis::Client::open(cluster.node(node).url()).expect("url");
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let all: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut connection)
            .await
            .expect("KEYS");
        keys.extend(
            all.into_iter()
                .filter(|key| !key.contains("quorumlock:epoch") && !key.ends_with(":fence")),
        );
    }
    keys
}

#[tokio::test]
async fn a_cluster_member_locks_keys_on_every_primary() {
    let cluster = start(3, 0);
    let locker = QuorumLocker::builder()
        .cluster(cluster.urls())
        .build()
        .await
        .unwrap();
    locker.prepare().await.unwrap();
    // Keys over many slots, so over all three primaries.
    let keys: Vec<String> = (0..30).map(|i| format!("job-{i}")).collect();
    let mut primaries = std::collections::BTreeSet::new();
    for key in &keys {
        primaries.insert(cluster.primary_for_key(key).unwrap());
        let lock = locker.try_acquire(key, TTL).await.unwrap();
        let held = value_on(&cluster, key)
            .await
            .expect("held on the slot's primary");
        assert!(held.starts_with(lock.token()), "{held}");
        assert!(matches!(
            locker.try_acquire(key, TTL).await,
            Err(Error::NotAcquired { .. })
        ));
        lock.extend(TTL).await.unwrap();
        assert_eq!(lock.release().await.unwrap(), 1);
        assert_eq!(value_on(&cluster, key).await, None);
    }
    assert_eq!(primaries.len(), 3, "the keys spread over every primary");
    let ran = locker
        .with_lock("{report}:nightly", TTL, |_status| async { 7 })
        .await
        .unwrap();
    assert_eq!(ran, 7);
    assert!(lock_keys(&cluster).await.is_empty());
}

#[tokio::test]
async fn fencing_tokens_grow_on_clusters_mixed_with_a_single_server() {
    let (a, b) = (start(3, 0), start(3, 0));
    let c = RedisServer::start().unwrap();
    let locker = QuorumLocker::builder()
        .cluster(a.urls())
        .cluster(b.urls())
        .url(c.url())
        .wake_waiters(true)
        .build()
        .await
        .unwrap();
    locker.prepare().await.unwrap();
    let mut last = 0;
    for key in ["ledger", "{acct-7}:ledger", "ledger"] {
        let lock = locker.lock(key).fenced().acquire().await.unwrap();
        let token = lock.fencing_token().unwrap();
        if key == "ledger" {
            assert!(token > last, "{token} after {last}");
            last = token;
        }
        lock.release().await.unwrap();
    }
    // The counter of a key without a tag shares its slot: `{ledger}:fence`.
    let client = redis::Client::open(a.node(a.primary_for_key("ledger").unwrap()).url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let counter: Option<u64> = redis::cmd("GET")
        .arg("{ledger}:fence")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(counter, Some(last));

    // A waiter wakes at the release, through PUBLISH on the cluster.
    let held = locker.try_acquire("handoff", TTL).await.unwrap();
    let waiter = {
        let locker = locker.clone();
        tokio::spawn(async move {
            locker
                .lock("handoff")
                .ttl(TTL)
                .wait(Duration::from_secs(20))
                .acquire()
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    held.release().await.unwrap();
    let next = waiter.await.unwrap().unwrap();
    next.release().await.unwrap();
    assert!(lock_keys(&a).await.is_empty());
    assert!(lock_keys(&b).await.is_empty());
}

#[tokio::test]
async fn keys_that_cannot_share_a_slot_are_refused() {
    let cluster = start(3, 0);
    let locker = QuorumLocker::builder()
        .cluster(cluster.urls())
        .build()
        .await
        .unwrap();
    for key in ["a}b", "}"] {
        match locker.try_acquire(key, TTL).await {
            Err(Error::KeyNotForCluster { key: shown }) => assert_eq!(shown, key),
            other => panic!("{key}: {other:?}"),
        }
    }
    match locker.try_acquire("quorumlock:epoch:{12}", TTL).await {
        Err(Error::ReservedKey { .. }) => {}
        other => panic!("{other:?}"),
    }
}

/// Waits until instance 0's health says it is quarantined after losing its
/// keys (a restart, a failover, a slot moved).
async fn until_quarantined(locker: &QuorumLocker) -> Duration {
    for _ in 0..200 {
        let health = locker.health().await;
        eprintln!("{health}");
        if let Some(left) = health.instances()[0].quarantined_for {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never quarantined: {}", locker.health().await);
}

#[tokio::test]
async fn a_primary_restarted_empty_quarantines_the_member() {
    let mut cluster = start(3, 0);
    let locker = QuorumLocker::builder()
        .cluster(cluster.urls())
        .build()
        .await
        .unwrap();
    locker.prepare().await.unwrap();
    let held = locker.try_acquire("job", TTL).await.unwrap();
    // A primary that holds none of our locks: its restart still counts.
    let other = cluster
        .primaries()
        .unwrap()
        .into_iter()
        .find(|&node| node != cluster.primary_for_key("job").unwrap())
        .unwrap();
    cluster.node_mut(other).restart_empty().unwrap();
    cluster.wait_until_ok(Duration::from_secs(30)).unwrap();
    until_quarantined(&locker).await;
    assert!(matches!(
        locker.try_acquire("another", TTL).await,
        Err(Error::NotAcquired { .. })
    ));
    drop(held);
}

#[tokio::test]
async fn a_failover_quarantines_the_member() {
    let mut cluster = start(3, 1);
    let locker = QuorumLocker::builder()
        .cluster(cluster.urls())
        .build()
        .await
        .unwrap();
    locker.prepare().await.unwrap();
    let lock = locker.try_acquire("job", TTL).await.unwrap();
    let primary = cluster.primary_for_key("job").unwrap();
    let replica = cluster.replicas_of(primary).unwrap()[0];
    cluster.failover(replica).unwrap();
    until_quarantined(&locker).await;
    // The lock stays ours where the replica had it; no new one is granted.
    assert!(matches!(
        locker.try_acquire("job-2", TTL).await,
        Err(Error::NotAcquired { .. })
    ));
    drop(lock);
}
