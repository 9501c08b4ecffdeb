//! Instances given as URLs with credentials or as the user's own connections;
//! scripts loaded by `prepare` and reloaded after `NOSCRIPT`; errors that name the
//! instance without its password.

mod common;

use std::time::Duration;

use common::{cluster, holders, TIMEOUT};
use quorumlock::testing::{RedisCluster, RedisServer};
use quorumlock::{Error, QuorumLocker, Vote};

const TTL: Duration = Duration::from_secs(30);

#[tokio::test]
async fn user_connections_mix_with_urls() {
    let cluster = cluster(3);
    let client = redis::Client::open(cluster.urls()[1].as_str()).unwrap();
    let manager = redis::aio::ConnectionManager::new(client).await.unwrap();
    let multiplexed = cluster.connection(2).await.unwrap();
    let locker = QuorumLocker::builder()
        .url(&cluster.urls()[0])
        .connection("manager", manager)
        .connection("multiplexed", multiplexed)
        .instance_timeout(TIMEOUT)
        .build()
        .await
        .unwrap();
    assert_eq!(
        locker.addresses().collect::<Vec<_>>()[1..],
        ["manager", "multiplexed"]
    );
    let lock = locker.acquire("job", TTL).await.unwrap();
    // Decided at two votes; the third set finishes in the background.
    locker.settle().await;
    assert_eq!(holders(&cluster, "job", lock.token()).await, [0, 1, 2]);
    lock.release().await.unwrap();

    let duplicate = QuorumLocker::builder()
        .connection("same", cluster.connection(0).await.unwrap())
        .connection("same", cluster.connection(1).await.unwrap())
        .build()
        .await;
    assert!(matches!(
        duplicate,
        Err(Error::DuplicateInstance {
            first: 0,
            second: 1,
            ..
        })
    ));
}

#[tokio::test]
async fn passwords_and_acl_users_authenticate() {
    let servers = RedisCluster::start_with(
        2,
        &RedisServer::builder().arg("--requirepass").arg("s3cret-pw"),
    )
    .unwrap();
    let ports: Vec<u16> = (0..2).map(|i| servers.server(i).port()).collect();
    // An ACL user on the second server.
    let admin = redis::Client::open(format!("redis://:s3cret-pw@127.0.0.1:{}", ports[1])).unwrap();
    let mut admin = admin.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "locker", "on", ">locker-pw", "~*", "+@all"][..])
        .query_async(&mut admin)
        .await
        .unwrap();

    let locker = QuorumLocker::builder()
        .url(format!("redis://:s3cret-pw@127.0.0.1:{}", ports[0]))
        .url(format!("redis://locker:locker-pw@127.0.0.1:{}", ports[1]))
        .instance_timeout(TIMEOUT)
        .build()
        .await
        .unwrap();
    let shown: Vec<_> = locker.addresses().collect();
    assert_eq!(shown[0], format!("redis://:***@127.0.0.1:{}", ports[0]));
    assert_eq!(
        shown[1],
        format!("redis://locker:***@127.0.0.1:{}", ports[1])
    );
    let lock = locker
        .try_acquire("job", TTL)
        .await
        .expect("authenticated on both");
    assert_eq!(lock.release().await.unwrap(), 2);

    // A wrong password fails that instance's vote, named by index and address,
    // without the password.
    let wrong = QuorumLocker::builder()
        .url(format!("redis://:s3cret-pw@127.0.0.1:{}", ports[0]))
        .url(format!("redis://locker:WRONG-pw@127.0.0.1:{}", ports[1]))
        .instance_timeout(TIMEOUT)
        .build()
        .await
        .unwrap();
    let err = wrong.try_acquire("job", TTL).await.unwrap_err();
    let cause = &err.causes()[1];
    assert_eq!(cause.index, 1);
    assert!(matches!(cause.vote, Vote::Failed(_)), "{cause}");
    let text = err.to_string();
    assert!(
        text.contains(&format!(
            "instance 1 (redis://locker:***@127.0.0.1:{})",
            ports[1]
        )),
        "{text}"
    );
    assert!(
        !text.contains("WRONG-pw") && !text.contains("s3cret-pw"),
        "{text}"
    );
    wrong.settle().await;
    // Instance 0 granted and was rolled back.
    let mut first = redis::Client::open(format!("redis://:s3cret-pw@127.0.0.1:{}", ports[0]))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut first)
        .await
        .unwrap();
    assert_eq!(
        keys,
        [quorumlock::EPOCH_KEY],
        "only the data set's identity is left"
    );
}

#[tokio::test]
async fn prepare_loads_scripts_and_release_survives_a_script_flush() {
    let cluster = cluster(3);
    let locker = common::locker(&cluster).await;
    assert_eq!(locker.prepare().await.unwrap().reachable(), 3);
    let mut loaded = Vec::new();
    for i in 0..3 {
        let mut connection = cluster.connection(i).await.unwrap();
        loaded.push(cached_scripts(&mut connection).await);
    }
    // Every script on every instance (the same number, and no fewer than the
    // release, extend and re-take scripts).
    assert!(
        loaded.iter().all(|&count| count == loaded[0] && count >= 3),
        "{loaded:?}"
    );
    for i in 0..3 {
        let mut connection = cluster.connection(i).await.unwrap();
        // As after a restart: the next release meets NOSCRIPT and reloads.
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(cached_scripts(&mut connection).await, 0);
    }
    let lock = locker.acquire("job", TTL).await.unwrap();
    assert!(lock.release().await.unwrap() >= 2);
    // Every instance reloaded the script and deleted the key.
    locker.settle().await;
    assert_eq!(common::total_keys(&cluster).await, 0);
}

#[tokio::test]
async fn prepare_reports_unreachable_instances() {
    let mut cluster = cluster(3);
    let locker = common::locker(&cluster).await;
    cluster.kill(0).unwrap();
    let health = locker.prepare().await.unwrap();
    assert_eq!(health.reachable(), 2, "a quorum is ready");
    assert!(!health.instances()[0].is_reachable());
    assert!(health.instances()[1].run_id.is_some());
    cluster.kill(1).unwrap();
    match locker.prepare().await {
        Err(Error::Unavailable {
            operation: "prepare",
            causes,
            ..
        }) => {
            assert!(matches!(causes[0].vote, Vote::Failed(_)));
            assert!(matches!(causes[2].vote, Vote::Granted));
        }
        other => panic!("{other:?}"),
    }
}

/// `number_of_cached_scripts` from `INFO memory`.
async fn cached_scripts(connection: &mut redis::aio::MultiplexedConnection) -> usize {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(connection)
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("number_of_cached_scripts:"))
        .and_then(|count| count.trim().parse().ok())
        .expect("INFO memory has number_of_cached_scripts")
}

#[tokio::test]
async fn health_reports_run_id_latency_and_clock() {
    let mut cluster = cluster(3);
    let locker = common::locker(&cluster).await;
    let health = locker.health().await;
    assert_eq!(health.reachable(), 3);
    assert!(health.has_quorum());
    assert_eq!(health.same_server(), None);
    let mut run_ids = Vec::new();
    for instance in health.instances() {
        assert!(instance.latency.is_some(), "{instance:?}");
        let run_id = instance.run_id.clone().expect("run_id");
        assert_eq!(run_id.len(), 40, "{run_id}");
        run_ids.push(run_id);
        // Same machine, same clock: within a second of ours.
        let server = instance.server_time.unwrap();
        let local = instance.local_time.unwrap();
        let apart = server
            .duration_since(local)
            .unwrap_or_else(|behind| behind.duration());
        assert!(apart < Duration::from_secs(1), "{apart:?}");
    }
    assert!(health.to_string().contains("3 of 3 instance(s) reachable"));

    // A restart is visible as a new run_id; a dead instance as unreachable.
    cluster.restart_empty(1).unwrap();
    cluster.kill(2).unwrap();
    let health = locker.health().await;
    let after = health.instances();
    assert_eq!(after[0].run_id.as_ref(), Some(&run_ids[0]));
    assert_ne!(after[1].run_id.as_ref(), Some(&run_ids[1]));
    assert!(!after[2].is_reachable());
    assert!(
        matches!(after[2].error, Some(Vote::Failed(_))),
        "{:?}",
        after[2]
    );
    assert_eq!(health.reachable(), 2);
}

#[tokio::test]
async fn prepare_refuses_one_server_under_two_addresses() {
    let cluster = cluster(2);
    let port = cluster.server(0).port();
    // Textually different, so the builder cannot tell; the run_id can.
    let locker = QuorumLocker::builder()
        .url(format!("redis://127.0.0.1:{port}"))
        .url(format!("redis://localhost:{port}"))
        .url(cluster.urls()[1].clone())
        .build()
        .await
        .unwrap();
    match locker.prepare().await {
        Err(Error::DuplicateInstance {
            first: 0,
            second: 1,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}
