//! Adversarial tests of Redis Cluster members, from a review: each held a
//! hole open (or checked a suspicion) against real redis-server processes
//! before the fix it names. The longest-TTL record lost across restarts, the
//! NOSCRIPT fallback during a migration to a new node, braces in the key
//! prefix; a paused primary leaves no key behind.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quorumlock::testing::{RedisServer, ShardedCluster};
use quorumlock::{Error, QuorumLocker};

fn start(primaries: usize, replicas: usize) -> ShardedCluster {
    ShardedCluster::start(primaries, replicas).unwrap_or_else(|e| panic!("cluster: {e}"))
}

async fn conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn node_conn(cluster: &ShardedCluster, node: usize) -> redis::aio::MultiplexedConnection {
    conn(&cluster.node(node).url()).await
}

/// GET and PTTL of `key` on node `node` directly (no redirection).
async fn raw_get(cluster: &ShardedCluster, node: usize, key: &str) -> (Option<String>, i64) {
    let mut c = node_conn(cluster, node).await;
    let v: Option<String> = redis::cmd("GET")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap_or(None);
    let t: i64 = redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap_or(-3);
    (v, t)
}

async fn node_id(cluster: &ShardedCluster, node: usize) -> String {
    let mut c = node_conn(cluster, node).await;
    redis::cmd("CLUSTER")
        .arg("MYID")
        .query_async(&mut c)
        .await
        .unwrap()
}

/// Waits (bounded) until instance 0 says quarantined.
async fn wait_quarantined(locker: &QuorumLocker, within: Duration) -> Option<Duration> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let health = locker.health().await;
        if let Some(left) = health.instances()[0].quarantined_for {
            return Some(left);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

// ---------------------------------------------------------------------------
// 1. Paused primary: redis-rs re-sends a grant after its response timeout; the
//    duplicate answers 0, the rollback reads "refused" and deletes nothing.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn paused_primary_duplicate_grant_leaves_key_behind() {
    let mut cluster = start(3, 0);
    let locker = QuorumLocker::builder()
        .cluster(cluster.urls())
        .build()
        .await
        .unwrap();
    locker.prepare().await.unwrap();
    let key = "paused-job";
    let node = cluster.primary_for_key(key).unwrap();
    // Warm the slot (first grant verifies it), then free it.
    let warm = locker
        .try_acquire(key, Duration::from_secs(20))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await; // a probe reads the raised TTL
    warm.release().await.unwrap();
    {
        let mut c = node_conn(&cluster, node).await;
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut c)
            .await
            .unwrap();
    }

    cluster.node_mut(node).pause().unwrap();
    let attempt = locker.try_acquire(key, Duration::from_secs(20)).await;
    eprintln!("attempt while paused: {:?}", attempt.as_ref().map(|_| ()));
    assert!(
        attempt.is_err(),
        "the attempt must fail while the primary is paused"
    );
    drop(attempt);
    // Longer than the cluster client's response timeout (CHECK_TIMEOUT, 1.25 s):
    // it re-sends the grant on the same connection.
    tokio::time::sleep(Duration::from_millis(2_800)).await;
    cluster.node_mut(node).resume().unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (value, pttl) = raw_get(&cluster, node, key).await;
    eprintln!("after resume: value={value:?} pttl={pttl}");
    {
        let mut c = node_conn(&cluster, node).await;
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut c)
            .await
            .unwrap();
        eprintln!("{stats}");
    }
    assert!(
        value.is_none(),
        "key left behind by a failed attempt: {value:?}, {pttl} ms to live"
    );
}

/// Control: the same with a single server (no cluster) leaves nothing.
#[tokio::test]
async fn control_paused_single_server_leaves_nothing() {
    let mut server = RedisServer::start().unwrap();
    let locker = QuorumLocker::builder()
        .url(server.url())
        .build()
        .await
        .unwrap();
    locker.prepare().await.unwrap();
    let key = "paused-job";
    server.pause().unwrap();
    let attempt = locker.try_acquire(key, Duration::from_secs(20)).await;
    assert!(attempt.is_err());
    drop(attempt);
    tokio::time::sleep(Duration::from_millis(2_800)).await;
    server.resume().unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let mut c = conn(&server.url()).await;
    let v: Option<String> = redis::cmd("GET")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(v.is_none(), "single server: {v:?}");
}

// ---------------------------------------------------------------------------
// 2. Key prefix with a hash tag: every epoch hash lands in one slot; the probe
//    sends anchors' HSETNX to primaries that do not serve it.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_braced_key_prefix_is_refused_on_a_clustered_locker() {
    let cluster = start(3, 0);
    for prefix in ["{app}:", "x{", "a}"] {
        match QuorumLocker::builder()
            .cluster(cluster.urls())
            .key_prefix(prefix)
            .build()
            .await
        {
            Err(Error::InvalidConfig { setting, .. }) => assert_eq!(setting, "key_prefix"),
            other => panic!("{prefix}: {:?}", other.map(|_| ())),
        }
    }
}

struct ExtraNode {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for ExtraNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        // The bus port (p + 10000) must be free too, and never 6379.
        if p != 6379 && p < 55000 && std::net::TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
            return p;
        }
    }
}

fn extra_node() -> ExtraNode {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            &format!("nodes-{port}.conf"),
            "--cluster-node-timeout",
            "1000",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            dir.path().to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let node = ExtraNode {
        child,
        port,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "extra node did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    node
}

#[tokio::test]
async fn migration_to_added_node_release_fails_with_noscript() {
    let cluster = start(3, 0);
    let locker = QuorumLocker::builder()
        .cluster(cluster.urls())
        .build()
        .await
        .unwrap();
    locker.prepare().await.unwrap();
    let key = "migrating-job";
    let slot = ShardedCluster::key_slot(key);
    let source = cluster.primary_for_key(key).unwrap();
    let lock = locker
        .try_acquire(key, Duration::from_secs(20))
        .await
        .unwrap();

    // A new, empty node joins the cluster.
    let extra = extra_node();
    let url = format!("redis://127.0.0.1:{}", extra.port);
    let mut d = conn(&url).await;
    let mut a = node_conn(&cluster, source).await;
    let _: () = redis::cmd("CLUSTER")
        .arg("MEET")
        .arg("127.0.0.1")
        .arg(extra.port)
        .query_async(&mut a)
        .await
        .unwrap();
    let d_id: String = redis::cmd("CLUSTER")
        .arg("MYID")
        .query_async(&mut d)
        .await
        .unwrap();
    let a_id = node_id(&cluster, source).await;
    // Wait (bounded) until the new node knows the source.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut d)
            .await
            .unwrap();
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut d)
            .await
            .unwrap();
        if nodes.contains(&a_id)
            && !nodes.contains("handshake")
            && info.contains("cluster_state:ok")
        {
            break;
        }
        assert!(Instant::now() < deadline, "meet: {nodes}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Migrate the lock's slot: importing / migrating, the lock key moved, the
    // slot left in the migrating state (as `redis-cli --cluster reshard` does
    // for as long as a slot's keys take).
    let _: () = redis::cmd("CLUSTER")
        .arg("SETSLOT")
        .arg(slot)
        .arg("IMPORTING")
        .arg(&a_id)
        .query_async(&mut d)
        .await
        .unwrap();
    let _: () = redis::cmd("CLUSTER")
        .arg("SETSLOT")
        .arg(slot)
        .arg("MIGRATING")
        .arg(&d_id)
        .query_async(&mut a)
        .await
        .unwrap();
    let moved: redis::Value = redis::cmd("MIGRATE")
        .arg("127.0.0.1")
        .arg(extra.port)
        .arg("")
        .arg(0)
        .arg(5000)
        .arg("KEYS")
        .arg(key)
        .query_async(&mut a)
        .await
        .unwrap();
    eprintln!("MIGRATE: {moved:?}");

    // Another locker cannot take the key meanwhile (safety check).
    let other = QuorumLocker::builder()
        .cluster(cluster.urls())
        .build()
        .await
        .unwrap();
    other.prepare().await.unwrap();
    let second = other.try_acquire(key, Duration::from_secs(5)).await;
    eprintln!(
        "second locker during migration: {:?}",
        second.as_ref().map(|_| ())
    );
    assert!(second.is_err(), "two holders during migration");

    let extended = lock.extend(Duration::from_secs(20)).await;
    eprintln!("extend during migration: {extended:?}");
    let released = lock.release().await;
    eprintln!("release during migration: {released:?}");
    let v: Option<String> = redis::cmd("GET")
        .arg(key)
        .query_async(&mut d)
        .await
        .ok()
        .flatten();
    let v = match v {
        Some(v) => Some(v),
        None => {
            let mut pipe = redis::pipe();
            pipe.cmd("ASKING").ignore().cmd("GET").arg(key);
            pipe.query_async::<(Option<String>,)>(&mut d)
                .await
                .ok()
                .and_then(|(v,)| v)
        }
    };
    eprintln!("key on the new node after release: {v:?}");
    assert!(
        extended.is_ok(),
        "extend failed mid-migration: {extended:?}"
    );
    assert!(
        released.is_ok() && v.is_none(),
        "release failed mid-migration, key left behind: {v:?}"
    );
}

// ---------------------------------------------------------------------------
// 4. The member's longest-TTL record: raise_anchors compares the TTL with the
//    member's max over all anchors, so an anchor that lost its record (its
//    primary restarted) is never raised again; once every anchor has lost it, a
//    locker reads no long TTL, and after the next restart quarantines for the
//    default only, while a longer lock is still held.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn longest_ttl_record_vanishes_and_quarantine_is_too_short() {
    const LONG: Duration = Duration::from_secs(60);
    const SHORT: Duration = Duration::from_secs(2);
    let mut cluster = start(3, 0);
    let key = "long-job";
    let b = cluster.primary_for_key(key).unwrap();
    let others: Vec<usize> = cluster
        .primaries()
        .unwrap()
        .into_iter()
        .filter(|&n| n != b)
        .collect();
    // L0 records LONG on every anchor, then goes away.
    {
        let l0 = QuorumLocker::builder()
            .cluster(cluster.urls())
            .build()
            .await
            .unwrap();
        l0.prepare().await.unwrap();
        let x = l0.try_acquire("warm", LONG).await.unwrap();
        x.release().await.unwrap();
    }
    // B (the key's primary) restarts: its anchor comes back without the record.
    cluster.node_mut(b).restart_empty().unwrap();
    cluster.wait_until_ok(Duration::from_secs(30)).unwrap();
    // L1 starts now, reads LONG on the other anchors, takes the key for LONG:
    // no raise (LONG is not above the member's max), B's anchor stays bare.
    let l1 = QuorumLocker::builder()
        .cluster(cluster.urls())
        .build()
        .await
        .unwrap();
    l1.prepare().await.unwrap();
    let held = l1.try_acquire(key, LONG).await.unwrap();
    let acquired_at = Instant::now();
    // The other primaries restart (the key is not on them: nothing is lost).
    for &n in &others {
        cluster.node_mut(n).restart_empty().unwrap();
        cluster.wait_until_ok(Duration::from_secs(30)).unwrap();
    }
    // Where is the record now?
    for n in cluster.primaries().unwrap() {
        let mut c = node_conn(&cluster, n).await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("quorumlock:epoch*")
            .query_async(&mut c)
            .await
            .unwrap();
        for k in keys {
            let ttl: Option<String> = redis::cmd("HGET")
                .arg(&k)
                .arg("ttl")
                .query_async(&mut c)
                .await
                .unwrap();
            eprintln!("node {n} {k} ttl={ttl:?}");
        }
    }
    // L2 starts now (before the loss that matters): the key is held, refused.
    let l2 = QuorumLocker::builder()
        .cluster(cluster.urls())
        .build()
        .await
        .unwrap();
    l2.prepare().await.unwrap();
    // (A short TTL: the locker's own longest TTL counts in its quarantine.)
    assert!(matches!(
        l2.try_acquire(key, SHORT).await,
        Err(Error::NotAcquired { .. })
    ));
    // Now B restarts: the key is lost. L2 should wait LONG; it waits the default.
    cluster.node_mut(b).restart_empty().unwrap();
    cluster.wait_until_ok(Duration::from_secs(30)).unwrap();
    let q = wait_quarantined(&l2, Duration::from_secs(5)).await;
    eprintln!("L2 quarantine: {q:?}");
    let deadline = Instant::now() + Duration::from_secs(40);
    let second = loop {
        match l2.try_acquire(key, SHORT).await {
            Ok(lock) => break Some(lock),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(err) => {
                eprintln!("L2 never acquired: {err:?}");
                break None;
            }
        }
    };
    if let Some(second) = &second {
        eprintln!(
            "L2 acquired {:?} after L1's grant; L1 still valid: {} ({:?} left)",
            acquired_at.elapsed(),
            held.is_valid(),
            held.remaining()
        );
        assert!(
            held.remaining().is_zero(),
            "two holders: L1 has {:?} left, L2 holds {}",
            held.remaining(),
            second.token()
        );
    }
}

// ---------------------------------------------------------------------------
// 5. A key prefix with an unclosed `{`: the epoch hash `x{quorumlock:epoch:{N}`
//    takes the tag `quorumlock:epoch:{N`, another slot than the lock key's.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn unclosed_brace_prefix_fails_every_grant() {
    let cluster = start(3, 0);
    let built = QuorumLocker::builder()
        .cluster(cluster.urls())
        .key_prefix("x{")
        .build()
        .await;
    let locker = match built {
        Ok(locker) => locker,
        Err(err) => {
            eprintln!("refused at build (fine): {err:?}");
            return;
        }
    };
    let prepared = tokio::time::timeout(Duration::from_secs(10), locker.prepare()).await;
    eprintln!("prepare: {:?}", prepared.as_ref().map(|r| r.is_ok()));
    let mut last = None;
    for _ in 0..20 {
        match locker.try_acquire("job", Duration::from_secs(5)).await {
            Ok(lock) => {
                lock.release().await.unwrap();
                return;
            }
            Err(err) => last = Some(err),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("prefix accepted, every grant fails: {last:?}");
}
