//! Tests of the `ShardedCluster` and `SentinelSet` fixtures: a real Redis Cluster
//! (routing by slot, a forced failover, a node restarted) and a primary watched by
//! Sentinels (its address, a failover that moves it).
//!
//! Each test has fixtures of its own, so they run in parallel; each is bounded by
//! the fixtures' own timeouts (30 s at most per wait).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use quorumlock::testing::{HarnessError, SentinelSet, ShardedCluster};
use redis::AsyncCommands;

/// A blocking connection to one server, with timeouts.
fn connect(addr: SocketAddr) -> redis::Connection {
    let client = redis::Client::open(format!("redis://{addr}")).expect("url");
    let connection = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    connection
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    connection
}

fn info_field(info: &str, name: &str) -> Option<String> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(|value| value.trim().to_owned())
}

fn timed<T>(what: &str, start: impl FnOnce() -> Result<T, HarnessError>) -> T {
    let began = Instant::now();
    let fixture = start().unwrap_or_else(|e| panic!("{what}: {e}"));
    eprintln!("{what}: {:?}", began.elapsed());
    fixture
}

#[test]
fn a_cluster_needs_three_primaries_and_at_most_one_replica_each() {
    for (primaries, replicas) in [(2, 0), (3, 2)] {
        match ShardedCluster::start(primaries, replicas) {
            Err(HarnessError::InvalidRequest { fixture, reason }) => {
                assert_eq!(fixture, "ShardedCluster");
                assert!(!reason.is_empty());
            }
            other => panic!("{primaries} primaries, {replicas} replicas: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_cluster_of_three_primaries_serves_each_key_on_its_slot() {
    let cluster = timed("ShardedCluster::start(3, 0)", || {
        ShardedCluster::start(3, 0)
    });
    assert_eq!(cluster.len(), 3);
    for node in cluster.nodes() {
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query(&mut connect(node.addr()))
            .expect("CLUSTER INFO");
        assert_eq!(
            info_field(&info, "cluster_state").as_deref(),
            Some("ok"),
            "{info}"
        );
        assert_eq!(
            info_field(&info, "cluster_slots_ok").as_deref(),
            Some("16384")
        );
        assert!(node.cluster_bus_port().is_some());
    }
    assert_eq!(cluster.primaries().expect("primaries"), vec![0, 1, 2]);
    assert!(cluster.replicas().expect("replicas").is_empty());

    let keys = ["alpha", "beta", "gamma", "{user1}.name", "{user1}.mail"];
    let mut seed = connect(cluster.node(0).addr());
    for key in keys {
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut seed)
            .expect("KEYSLOT");
        assert_eq!(ShardedCluster::key_slot(key), slot, "{key}");
    }

    let client = redis::cluster::ClusterClient::new(cluster.urls()).expect("cluster client");
    let mut routed = client
        .get_async_connection()
        .await
        .expect("cluster connection");
    for key in keys {
        let () = routed
            .set(key, format!("value of {key}"))
            .await
            .expect("SET");
        let owner = cluster.primary_for_key(key).expect("owner");
        let direct: Option<String> = redis::cmd("GET")
            .arg(key)
            .query(&mut connect(cluster.node(owner).addr()))
            .expect("GET on the slot's primary");
        assert_eq!(direct, Some(format!("value of {key}")));
        // Any other primary redirects.
        let other = (owner + 1) % cluster.len();
        let moved = redis::cmd("GET")
            .arg(key)
            .query::<Option<String>>(&mut connect(cluster.node(other).addr()))
            .expect_err("a node that does not serve the slot");
        assert_eq!(moved.code(), Some("MOVED"), "{moved}");
    }
    assert!(matches!(
        cluster.slot_primary(16384),
        Err(HarnessError::InvalidRequest { .. })
    ));
}

#[tokio::test]
async fn a_forced_failover_hands_a_shard_to_its_replica_and_a_restart_rejoins() {
    let mut cluster = timed("ShardedCluster::start(3, 1)", || {
        ShardedCluster::start(3, 1)
    });
    assert_eq!(cluster.len(), 6);
    let primaries = cluster.primaries().expect("primaries");
    assert_eq!(primaries.len(), 3);
    assert_eq!(cluster.replicas().expect("replicas").len(), 3);
    for &primary in &primaries {
        assert_eq!(cluster.replicas_of(primary).expect("replicas of").len(), 1);
    }

    let key = "quorumlock:failover";
    let old = cluster.primary_for_key(key).expect("owner");
    let replica = cluster.replicas_of(old).expect("replicas of")[0];
    let client = redis::cluster::ClusterClient::new(cluster.urls()).expect("cluster client");
    let mut routed = client
        .get_async_connection()
        .await
        .expect("cluster connection");
    // SET and WAIT on one connection: WAIT counts the replicas that have this
    // connection's last write, so the replica has the key before it takes over.
    let mut owner = connect(cluster.node(old).addr());
    let () = redis::cmd("SET")
        .arg(key)
        .arg("before")
        .query(&mut owner)
        .expect("SET");
    let acked: u64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query(&mut owner)
        .expect("WAIT");
    assert_eq!(acked, 1);

    assert!(matches!(
        cluster.failover(old),
        Err(HarnessError::InvalidRequest { .. })
    ));
    let began = Instant::now();
    cluster.failover(replica).expect("failover");
    eprintln!("ShardedCluster::failover: {:?}", began.elapsed());
    assert_eq!(cluster.primary_for_key(key).expect("owner"), replica);
    assert_eq!(
        cluster.replicas_of(replica).expect("replicas of"),
        vec![old]
    );
    // The cluster client follows the MOVED to the new primary.
    let value: Option<String> = routed.get(key).await.expect("GET");
    assert_eq!(value.as_deref(), Some("before"));

    // A killed node comes back under the same identity, without its keys, and
    // resyncs as the replica it was.
    cluster.node_mut(old).kill().expect("kill");
    let began = Instant::now();
    cluster.node_mut(old).restart_empty().expect("restart");
    cluster
        .wait_until_ok(Duration::from_secs(20))
        .expect("rejoined");
    eprintln!(
        "ShardedCluster node restart and rejoin: {:?}",
        began.elapsed()
    );
    assert_eq!(
        cluster.replicas_of(replica).expect("replicas of"),
        vec![old]
    );
    let mut restarted = connect(cluster.node(old).addr());
    let () = redis::cmd("READONLY")
        .query(&mut restarted)
        .expect("READONLY");
    let resynced: Option<String> = redis::cmd("GET")
        .arg(key)
        .query(&mut restarted)
        .expect("GET on the replica");
    assert_eq!(resynced.as_deref(), Some("before"));
}

#[test]
fn sentinels_report_the_primary_and_follow_a_failover() {
    let mut set = timed("SentinelSet::start", SentinelSet::start);
    assert_eq!(set.sentinel_urls().len(), 3);
    assert_eq!(set.service_name(), SentinelSet::SERVICE_NAME);
    let primary = set.primary().addr();
    assert_eq!(set.current_primary_addr().expect("primary"), primary);

    let mut connection = connect(primary);
    let () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query(&mut connection)
        .expect("SET");
    let acked: u64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query(&mut connection)
        .expect("WAIT");
    assert_eq!(acked, 1);

    let began = Instant::now();
    let new = set.failover().expect("failover");
    eprintln!("SentinelSet::failover: {:?}", began.elapsed());
    assert_eq!(new, set.replica().addr());
    assert_eq!(set.current_primary_addr().expect("primary"), new);
    let value: Option<String> = redis::cmd("GET")
        .arg("k")
        .query(&mut connect(new))
        .expect("GET");
    assert_eq!(value.as_deref(), Some("v"));

    // The old primary is made a replica of the new one.
    let began = Instant::now();
    set.wait_until_ready(Duration::from_secs(20))
        .expect("ready again");
    eprintln!("SentinelSet old primary demoted: {:?}", began.elapsed());
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query(&mut connect(primary))
        .expect("INFO");
    assert_eq!(
        info_field(&info, "role").as_deref(),
        Some("slave"),
        "{info}"
    );
}
