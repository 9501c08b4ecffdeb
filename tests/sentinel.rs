//! Sentinel-managed primaries as quorum members, against real local Sentinel
//! sets (`testing::SentinelSet`: a primary, a replica, three Sentinels): every
//! operation, following a failover (which quarantines the member), the
//! failover hole (a promoted replica that lacks a lock), and the opt-in `WAIT`.

mod common;

use std::time::Duration;

use quorumlock::testing::{RedisServer, SentinelSet};
use quorumlock::{Error, QuorumLocker, SentinelMember};

const TTL: Duration = Duration::from_secs(10);

fn start() -> SentinelSet {
    SentinelSet::start().unwrap_or_else(|e| panic!("sentinel set: {e}"))
}

fn member(set: &SentinelSet) -> SentinelMember {
    SentinelMember::new(set.service_name(), set.sentinel_urls())
}

async fn connection(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn get(server: &RedisServer, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query_async(&mut connection(server).await)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_sentinel_member_locks_on_the_primary() {
    let set = start();
    let (b, c) = (RedisServer::start().unwrap(), RedisServer::start().unwrap());
    let locker = QuorumLocker::builder()
        .sentinel(member(&set))
        .url(b.url())
        .url(c.url())
        .build()
        .await
        .unwrap();
    locker.prepare().await.unwrap();
    let lock = locker.lock("job").fenced().try_acquire().await.unwrap();
    assert!(get(set.primary(), "job")
        .await
        .unwrap()
        .starts_with(lock.token()));
    lock.extend(TTL).await.unwrap();
    assert!(lock.release().await.unwrap() >= 2);
    assert_eq!(get(set.primary(), "job").await, None);
    let health = locker.health().await;
    assert!(
        health
            .to_string()
            .contains("sentinel \"quorumlock\" via redis://"),
        "{health}"
    );
}

/// Waits until member 0 is quarantined after losing its keys.
async fn until_quarantined(locker: &QuorumLocker) -> Duration {
    for _ in 0..200 {
        if let Some(left) = locker.health().await.instances()[0].quarantined_for {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never quarantined: {}", locker.health().await);
}

#[tokio::test]
async fn a_failover_is_followed_and_quarantines_the_member() {
    let mut set = start();
    // A short TTL, so that the quarantine ends within the test: the member
    // then grants on the new primary.
    let locker = QuorumLocker::builder()
        .sentinel(member(&set))
        .default_ttl(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    locker.prepare().await.unwrap();
    let ttl = Duration::from_secs(1);
    locker
        .try_acquire("before", ttl)
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    let promoted = set.failover().unwrap();
    assert_eq!(promoted, set.replica().addr());
    until_quarantined(&locker).await;
    let lock = locker
        .lock("after")
        .ttl(ttl)
        .wait(Duration::from_secs(20))
        .acquire()
        .await
        .unwrap();
    assert!(get(set.replica(), "after")
        .await
        .unwrap()
        .starts_with(lock.token()));
    lock.release().await.unwrap();
}

/// The failover hole: a holder has `job` on the Sentinel member S and on B
/// (C was out of its reach); S fails over to a replica that lacks `job`
/// (replication is asynchronous). A second locker that knew S before must
/// not count the promoted replica's grant: it would get S and C, two of
/// three, while the first still holds the lock.
#[tokio::test]
async fn a_promoted_replica_that_lacks_a_lock_does_not_count() {
    let mut set = start();
    let (b, c) = (RedisServer::start().unwrap(), RedisServer::start().unwrap());
    let holder = QuorumLocker::builder()
        .sentinel(member(&set))
        .url(b.url())
        .url("redis://127.0.0.1:1")
        .build()
        .await
        .unwrap();
    let witness = QuorumLocker::builder()
        .sentinel(member(&set))
        .url(b.url())
        .url(c.url())
        .build()
        .await
        .unwrap();
    witness.prepare().await.unwrap();
    let held = holder
        .lock("job")
        .ttl(TTL)
        .wait(Duration::from_secs(10))
        .acquire()
        .await
        .unwrap();
    // The replica loses the lock, as a lagging one would not have it yet.
    let mut replica = connection(set.replica()).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("replica-read-only")
        .arg("no")
        .query_async(&mut replica)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg("job")
        .query_async(&mut replica)
        .await
        .unwrap();
    set.failover().unwrap();
    for _ in 0..40 {
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
    assert!(witness.health().await.instances()[0]
        .quarantined_for
        .is_some());
    held.release().await.unwrap();
}

#[tokio::test]
async fn wait_for_replicas_counts_only_replicated_grants() {
    let set = start();
    let one = QuorumLocker::builder()
        .sentinel(member(&set).wait_for_replicas(1, Duration::from_millis(20)))
        .build()
        .await
        .unwrap();
    one.prepare().await.unwrap();
    let lock = one.try_acquire("job", TTL).await.unwrap();
    // The replica had it when the grant counted.
    assert!(get(set.replica(), "job")
        .await
        .unwrap()
        .starts_with(lock.token()));
    lock.release().await.unwrap();

    // Two replicas asked for, one there: no grant counts, no key stays.
    let two = QuorumLocker::builder()
        .sentinel(member(&set).wait_for_replicas(2, Duration::from_millis(10)))
        .build()
        .await
        .unwrap();
    two.prepare().await.unwrap();
    assert!(matches!(
        two.try_acquire("other", TTL).await,
        Err(Error::NotAcquired { .. })
    ));
    two.settle().await;
    assert_eq!(get(set.primary(), "other").await, None);

    match QuorumLocker::builder()
        .sentinel(member(&set).wait_for_replicas(0, Duration::from_millis(10)))
        .build()
        .await
    {
        Err(Error::InvalidConfig { setting, .. }) => assert_eq!(setting, "wait_for_replicas"),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

/// Workers with fresh lockers at the defaults contend for a few keys on
/// `[Sentinel member, single, single]` while the Sentinels fail the primary
/// over: no two holders at once, no fencing token out of order, no key left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_overlap_through_a_sentinel_failover() {
    const KEYS: &[&str] = &["ledger", "cron"];
    let mut set = start();
    let (b, c) = (RedisServer::start().unwrap(), RedisServer::start().unwrap());
    let mut lockers = Vec::new();
    for _ in 0..4 {
        let builder = QuorumLocker::builder()
            .sentinel(member(&set))
            .url(b.url())
            .url(c.url());
        lockers.push(builder.build().await.unwrap());
    }
    let workers = common::workers::start(lockers, KEYS);
    let faults = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_secs(1));
        set.failover().unwrap();
        std::thread::sleep(Duration::from_secs(2));
        set
    });
    let set = faults.await.unwrap();
    let done = workers.stop().await;
    done.assert_safe(20);
    eprintln!("{} locks held, 0 overlaps", done.held);
    for server in [set.primary(), set.replica(), &b, &c] {
        for key in KEYS {
            assert_eq!(
                get(server, key).await,
                None,
                "{key} left on {}",
                server.addr()
            );
        }
    }
}

/// With `wake_waiters`, a waiter hears the release through the Sentinel
/// member (its only instance) long before its 5 s fallback retry, and again
/// after a failover, through the new primary.
#[tokio::test]
async fn waiters_are_woken_through_the_sentinel_member_across_a_failover() {
    use quorumlock::RetryPolicy;
    use tokio::time::Instant;

    let mut set = start();
    let build = || {
        QuorumLocker::builder()
            .sentinel(member(&set))
            .wake_waiters(true)
            .default_ttl(Duration::from_secs(1))
            .retry(RetryPolicy::fixed(Duration::from_secs(5)))
            .default_wait(Duration::from_secs(30))
            .build()
    };
    let (holder, waiter) = (build().await.unwrap(), build().await.unwrap());
    holder.prepare().await.unwrap();
    waiter.prepare().await.unwrap();
    for round in 0..2 {
        if round == 1 {
            set.failover().unwrap();
            // Past the quarantine the failover starts (the 1 s TTL).
            holder
                .lock("report")
                .wait(Duration::from_secs(20))
                .acquire()
                .await
                .unwrap()
                .release()
                .await
                .unwrap();
        }
        let held = holder.acquire("report", TTL).await.unwrap();
        let waiting = {
            let waiter = waiter.clone();
            tokio::spawn(async move {
                let lock = waiter.acquire("report", TTL).await.unwrap();
                let at = Instant::now();
                lock.release().await.unwrap();
                at
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let released = Instant::now();
        if let Err(err) = held.release().await {
            panic!("round {round}: release: {err:?}\n{}", holder.health().await);
        }
        let took = waiting.await.unwrap().duration_since(released);
        assert!(
            took < Duration::from_secs(2),
            "round {round}: {took:?} after the release: not woken"
        );
    }
}
