//! Redis Cluster members (feature `cluster`) against real local clusters
//! (`testing::ShardedCluster`): every operation on many keys spread over the
//! primaries, a quorum mixing clusters and a single server, and the defences
//! per primary (a restart, a failover, a slot served by another node) that
//! quarantine the member.

mod common;

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

/// The lock keys on the server at `url`: every key but the crate's own
/// (epoch hashes, fencing counters).
async fn lock_keys_at(url: &str) -> redis::RedisResult<Vec<String>> {
    let client = redis::Client::open(url)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let all: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut connection)
        .await?;
    Ok(all
        .into_iter()
        .filter(|key| !key.contains("quorumlock:epoch") && !key.ends_with(":fence"))
        .collect())
}

/// The lock keys on every primary.
async fn lock_keys(cluster: &ShardedCluster) -> Vec<String> {
    let mut keys = Vec::new();
    for node in cluster.primaries().expect("primaries") {
        keys.extend(lock_keys_at(&cluster.node(node).url()).await.expect("KEYS"));
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

#[test]
fn qlock_runs_a_command_under_a_lock_on_clusters() {
    let (a, b) = (start(3, 0), start(3, 0));
    let c = RedisServer::start().unwrap();
    let qlock = || {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_qlock"));
        command
            .env_remove("QLOCK_REDIS_URLS")
            .env_remove("QLOCK_KEY_PREFIX")
            .arg("--redis")
            .arg(c.url())
            .arg("--cluster")
            .arg(a.urls().join(","))
            .arg("--cluster")
            .arg(&b.urls()[1]);
        command
    };
    let output = qlock()
        .args([
            "run",
            "--key",
            "{nightly}:report",
            "--",
            "sh",
            "-c",
            "echo ran",
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "ran");
    // A key that cannot fit a slot is a usage error, before CMD starts.
    let output = qlock()
        .args(["run", "--key", "a}b", "--", "sh", "-c", "echo ran"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("hash tag"));
    let health = qlock().arg("health").output().unwrap();
    assert!(health.status.success(), "{health:?}");
    assert!(
        String::from_utf8_lossy(&health.stdout).contains("cluster redis://"),
        "{health:?}"
    );
}

/// Workers with fresh lockers at the defaults (no `prepare`) contend for a few
/// keys on `[cluster A, cluster B, single C]` while A's primaries are restarted
/// empty and killed and B fails over to a replica; the checker finds no two
/// holders of one key at once and no fencing token out of order, and no lock
/// key is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_overlap_through_restarts_and_failovers_of_cluster_primaries() {
    const KEYS: &[&str] = &["ledger", "{acct-1}:ledger", "cron"];
    let mut a = start(3, 0);
    let mut b = start(3, 1);
    let c = RedisServer::start().unwrap();
    let mut lockers = Vec::new();
    for _ in 0..6 {
        let builder = QuorumLocker::builder()
            .cluster(a.urls())
            .cluster(b.urls())
            .url(c.url());
        lockers.push(builder.build().await.unwrap());
    }
    let workers = common::workers::start(lockers, KEYS);
    let faults = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_secs(2));
        let primary = a.primaries().unwrap()[0];
        a.node_mut(primary).restart_empty().unwrap();
        a.wait_until_ok(Duration::from_secs(30)).unwrap();
        std::thread::sleep(Duration::from_secs(1));
        let primary = b.primary_for_key("ledger").unwrap();
        let replica = b.replicas_of(primary).unwrap()[0];
        b.failover(replica).unwrap();
        std::thread::sleep(Duration::from_secs(1));
        let primary = a.primary_for_key("cron").unwrap();
        a.node_mut(primary).kill().unwrap();
        std::thread::sleep(Duration::from_secs(2));
        (a, b)
    });
    let (a, b) = faults.await.unwrap();
    let done = workers.stop().await;
    done.assert_safe(50);
    eprintln!("{} locks held, 0 overlaps", done.held);
    // No lock key left on the servers that are up.
    let mut left = lock_keys_running(&a).await;
    left.extend(lock_keys_running(&b).await);
    assert!(left.is_empty(), "{left:?}");
    drop(c);
}

/// As `lock_keys`, on every node still running (one just killed may not
/// answer).
async fn lock_keys_running(cluster: &ShardedCluster) -> Vec<String> {
    let mut keys = Vec::new();
    for node in cluster.nodes().iter().filter(|node| node.is_running()) {
        keys.extend(lock_keys_at(&node.url()).await.unwrap_or_default());
    }
    keys
}

/// The restart hole, on one primary of a cluster: a holder has `job` on the
/// cluster A and on B (C was out of its reach); A's primary for `job` restarts
/// empty. A second locker that knew A before the restart must not count A's
/// grant: it would get A and C, two of three, while the first still holds the
/// lock.
#[tokio::test]
async fn a_locker_that_knew_the_primary_does_not_count_its_grant_after_a_restart() {
    let mut a = start(3, 0);
    let b = RedisServer::start().unwrap();
    let c = RedisServer::start().unwrap();
    // The holder's third instance is unreachable (nothing listens on port 1).
    let holder = QuorumLocker::builder()
        .cluster(a.urls())
        .url(b.url())
        .url("redis://127.0.0.1:1")
        .build()
        .await
        .unwrap();
    let witness = QuorumLocker::builder()
        .cluster(a.urls())
        .url(b.url())
        .url(c.url())
        .build()
        .await
        .unwrap();
    witness.prepare().await.unwrap();
    // The witness has granted in the key's slot before.
    witness
        .try_acquire("job", TTL)
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    let held = holder
        .lock("job")
        .ttl(TTL)
        .wait(Duration::from_secs(10))
        .acquire()
        .await
        .unwrap();
    let primary = a.primary_for_key("job").unwrap();
    a.node_mut(primary).restart_empty().unwrap();
    a.wait_until_ok(Duration::from_secs(30)).unwrap();
    for _ in 0..20 {
        match witness.try_acquire("job", TTL).await {
            Err(Error::NotAcquired { .. }) => {}
            Ok(second) => panic!(
                "a second holder while the first holds the lock for {:?} more",
                held.remaining().min(second.remaining())
            ),
            Err(other) => panic!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    held.release().await.unwrap();
}

/// As above, through a slot migrated between primaries mid-run (`ASK` and
/// `TRYAGAIN` for as long as it lasts) and a primary paused for a second:
/// no overlap, no stale token, no key left, and no call much past its wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_overlap_through_a_slot_migration_and_a_paused_primary() {
    const KEYS: &[&str] = &["{mig}:a", "{mig}:b", "other"];
    let mut a = start(3, 0);
    let (b, c) = (RedisServer::start().unwrap(), RedisServer::start().unwrap());
    let mut lockers = Vec::new();
    for _ in 0..4 {
        let builder = QuorumLocker::builder()
            .cluster(a.urls())
            .url(b.url())
            .url(c.url());
        lockers.push(builder.build().await.unwrap());
    }
    let workers = common::workers::start(lockers, KEYS);
    let faults = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_secs(1));
        let slot = ShardedCluster::key_slot("{mig}");
        let from = a.slot_primary(slot).unwrap();
        let to = a
            .primaries()
            .unwrap()
            .into_iter()
            .find(|&node| node != from)
            .unwrap();
        a.migrate_slot(slot, to, Duration::from_millis(300))
            .unwrap();
        assert_eq!(a.slot_primary(slot).unwrap(), to);
        std::thread::sleep(Duration::from_secs(1));
        let paused = a.primary_for_key("other").unwrap();
        a.node_mut(paused).pause().unwrap();
        std::thread::sleep(Duration::from_secs(1));
        a.node_mut(paused).resume().unwrap();
        std::thread::sleep(Duration::from_secs(2));
        a
    });
    let a = faults.await.unwrap();
    let done = workers.stop().await;
    done.assert_safe(20);
    eprintln!(
        "{} locks held, 0 overlaps, longest acquire {:?}",
        done.held, done.longest
    );
    // A hang check, not a speed limit: the wait, a rollback bound and slack.
    let wait = common::workers::WAIT;
    assert!(
        done.longest < wait + Duration::from_secs(3),
        "{:?}",
        done.longest
    );
    let mut left = lock_keys_running(&a).await;
    for server in [&b, &c] {
        left.extend(lock_keys_at(&server.url()).await.unwrap());
    }
    assert!(left.is_empty(), "{left:?}");
}

/// Moving from one Redis to a cluster in the three phases of
/// docs/MIGRATION.md: `[old]`, `[old, cluster]` with quorum 2, `[cluster]`.
/// Clients of adjacent phases run side by side (a rolling deploy) on shared
/// keys: the checker finds no overlap, and keys pass between the phases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_from_one_server_to_a_cluster_in_three_phases() {
    use quorumlock::testing::Checker;
    use tokio::task::JoinSet;
    use tokio::time::Instant;

    let old = RedisServer::start().unwrap();
    let new = start(3, 0);
    let phase = |n: usize| {
        let builder = QuorumLocker::builder()
            .instance_timeout(Duration::from_millis(500))
            .default_wait(Duration::from_secs(3));
        match n {
            1 => builder.url(old.url()),
            2 => builder.url(old.url()).cluster(new.urls()).quorum(2),
            _ => builder.cluster(new.urls()),
        }
    };
    for (a, b) in [(1, 2), (2, 3)] {
        let checker = Checker::new();
        let mut tasks = JoinSet::new();
        for phase_n in [a, b] {
            for client in 0..2 {
                let locker = phase(phase_n).build().await.unwrap();
                let checker = checker.clone();
                let holder = phase_n * 10 + client;
                tasks.spawn(async move {
                    for i in 0..20 {
                        let key = format!("job{}", (holder + i) % 2);
                        let Ok(lock) = locker.acquire(&key, Duration::from_secs(2)).await else {
                            continue;
                        };
                        let start = Instant::now();
                        tokio::time::sleep(Duration::from_millis(3)).await;
                        let end = Instant::now().min(lock.valid_until());
                        checker.record(&key, holder, start, end);
                        lock.release().await.unwrap();
                    }
                    locker.settle().await;
                });
            }
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        let violations = checker.violations();
        assert!(violations.is_empty(), "phases {a} and {b}: {violations:?}");
        let tenures = checker.tenures();
        for n in [a, b] {
            assert!(
                tenures.iter().any(|tenure| tenure.holder / 10 == n),
                "phase {n} never held a lock"
            );
        }
    }
    assert!(lock_keys(&new).await.is_empty());
}

/// The failover hole for a locker that starts after it: the holder has `job`
/// on the cluster A and on B (C out of its reach); the replica of `job`'s
/// primary takes over and lacks the key (as a lagging one would). A locker
/// built after the failover never saw the old primary, but the anchor's
/// record of the primary's identity says it changed just now: it must not
/// count A's grant while the holder holds the lock.
#[tokio::test]
async fn a_locker_started_after_a_failover_does_not_count_the_promoted_replica() {
    let mut a = start(3, 1);
    let b = RedisServer::start().unwrap();
    let c = RedisServer::start().unwrap();
    let holder = QuorumLocker::builder()
        .cluster(a.urls())
        .url(b.url())
        .url("redis://127.0.0.1:1")
        .build()
        .await
        .unwrap();
    let held = holder
        .lock("job")
        .ttl(TTL)
        .wait(Duration::from_secs(10))
        .acquire()
        .await
        .unwrap();
    let primary = a.primary_for_key("job").unwrap();
    let replica = a.replicas_of(primary).unwrap()[0];
    a.failover(replica).unwrap();
    // The promoted replica lacks the key, as one that lagged would.
    let client = redis::Client::open(a.node(replica).url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let deleted: i64 = redis::cmd("DEL")
        .arg("job")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    let late = QuorumLocker::builder()
        .cluster(a.urls())
        .url(b.url())
        .url(c.url())
        .build()
        .await
        .unwrap();
    for _ in 0..40 {
        match late.try_acquire("job", TTL).await {
            Err(Error::NotAcquired { .. }) => {}
            Ok(second) => {
                let overlap = held.remaining().min(second.remaining());
                assert!(
                    overlap.is_zero(),
                    "a second holder while the first holds the lock for {overlap:?} more"
                );
            }
            Err(other) => panic!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    held.release().await.unwrap();
}

#[tokio::test]
async fn a_cluster_node_given_as_a_single_server_is_named_as_such() {
    let cluster = start(3, 0);
    let locker = QuorumLocker::builder()
        .url(cluster.urls()[0].clone())
        .build()
        .await
        .unwrap();
    let prepared = locker.prepare().await;
    let text = format!("{:?}", prepared.as_ref().err());
    assert!(text.contains("Builder::cluster"), "{text}");
}
