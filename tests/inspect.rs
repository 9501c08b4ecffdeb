//! `QuorumLocker::inspect` and `force_release` against real servers: what each
//! instance holds, a quorum's holder, an instance that does not answer, a
//! foreign value, and a forced release that leaves nothing behind.

mod common;

use std::time::Duration;

use common::{cluster, locker, set, total_keys, values};
use quorumlock::Error;

const TTL: Duration = Duration::from_secs(30);

#[tokio::test]
async fn inspect_reports_each_instance_and_the_quorum_holder() {
    let mut cluster = cluster(3);
    let locker = locker(&cluster).await;

    let free = locker.inspect("report").await.unwrap();
    assert_eq!(free.holder(), None);
    assert!(free.instances().iter().all(|i| matches!(i.read, Ok(None))));

    let lock = locker
        .lock("report")
        .ttl(TTL)
        .metadata("host=worker-7")
        .acquire()
        .await
        .unwrap();
    let seen = locker.inspect("report").await.unwrap();
    assert_eq!(seen.holder(), Some(lock.token()));
    for instance in seen.instances() {
        let holding = instance.holding().expect("held everywhere");
        assert_eq!(holding.token(), Some(lock.token()));
        assert_eq!(holding.metadata(), Some("host=worker-7"));
        let left = holding.ttl.expect("a TTL");
        assert!(
            left <= TTL && left > TTL - Duration::from_secs(5),
            "{left:?}"
        );
    }
    assert!(seen.to_string().contains("on a quorum"), "{seen}");

    // Another client's value on one instance, and one instance stopped: the
    // remaining one still holds our token, which is no longer a quorum's.
    set(&cluster, 0, "report", "someone-else 1a2b3c4d").await;
    cluster.pause(2).unwrap();
    let seen = locker.inspect("report").await.unwrap();
    cluster.resume(2).unwrap();
    assert_eq!(seen.holder(), None, "{seen}");
    assert_eq!(
        seen.instances()[0].holding().and_then(|h| h.token()),
        Some("someone-else")
    );
    assert!(seen.instances()[2].read.is_err(), "{seen}");
    assert!(seen.to_string().contains("unreachable"), "{seen}");

    lock.leave_to_expire();
    assert_eq!(locker.force_release("report").await.unwrap(), 3);
    assert_eq!(values(&cluster, "report").await, vec![None, None, None]);
    assert_eq!(locker.force_release("report").await.unwrap(), 0);
    locker.settle().await;
    assert_eq!(total_keys(&cluster).await, 0);
}

#[tokio::test]
async fn a_forced_release_frees_a_stuck_lock() {
    let cluster = cluster(3);
    let locker = locker(&cluster).await;
    let stuck = locker.acquire("migration", TTL).await.unwrap();
    stuck.leave_to_expire(); // as if its process died
    assert!(locker.try_acquire("migration", TTL).await.is_err());
    assert_eq!(locker.force_release("migration").await.unwrap(), 3);
    let next = locker.try_acquire("migration", TTL).await.unwrap();
    next.release().await.unwrap();
    locker.settle().await;
    assert_eq!(total_keys(&cluster).await, 0);
}

#[tokio::test]
async fn keys_no_lock_can_have_are_refused_before_any_io() {
    let cluster = cluster(1);
    let locker = locker(&cluster).await;
    assert!(matches!(locker.inspect("").await, Err(Error::EmptyKey)));
    for key in ["quorumlock:epoch", "job:fence"] {
        assert!(matches!(
            locker.inspect(key).await,
            Err(Error::ReservedKey { .. })
        ));
        assert!(matches!(
            locker.force_release(key).await,
            Err(Error::ReservedKey { .. })
        ));
    }
}
