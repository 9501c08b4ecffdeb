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
    let size: usize = redis::cmd("DBSIZE").query_async(&mut first).await.unwrap();
    assert_eq!(size, 0);
}

#[tokio::test]
async fn prepare_loads_scripts_and_release_survives_a_script_flush() {
    let cluster = cluster(3);
    let locker = common::locker(&cluster).await;
    assert_eq!(locker.prepare().await.unwrap(), 3);
    for i in 0..3 {
        let mut connection = cluster.connection(i).await.unwrap();
        assert!(cached_scripts(&mut connection).await >= 1, "instance {i}");
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
    assert_eq!(locker.prepare().await.unwrap(), 2, "a quorum is ready");
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
