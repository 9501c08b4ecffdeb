//! Acquire, try_acquire and release at N = 1, 2, 3 and 5 against real servers.

mod common;

use std::time::Duration;

use common::{cluster, holders, locker, values, SIZES};
use quorumlock::{Error, Shortfall};

const TTL: Duration = Duration::from_secs(30);

#[tokio::test]
async fn acquire_then_release_at_every_size() {
    for n in SIZES {
        let cluster = cluster(n);
        let locker = locker(&cluster).await;
        assert_eq!(locker.instances(), n);
        assert_eq!(locker.quorum(), n / 2 + 1);

        let lock = locker.acquire("job", TTL).await.expect("acquire");
        assert_eq!(lock.key(), "job");
        assert!(lock.is_valid());
        assert!(lock.remaining() <= TTL);
        assert_eq!(lock.token().len(), 32);
        let on = holders(&cluster, "job", lock.token()).await;
        assert!(on.len() >= locker.quorum(), "n = {n}: held on {on:?}");

        let released = lock.release().await.expect("release");
        assert!(
            released >= 1 && released <= n,
            "n = {n}: released {released}"
        );
        locker.settle().await;
        assert_eq!(values(&cluster, "job").await, vec![None; n], "n = {n}");
    }
}

#[tokio::test]
async fn try_acquire_of_a_held_key_fails_with_every_vote() {
    for n in SIZES {
        let cluster = cluster(n);
        let first = locker(&cluster).await;
        let second = locker(&cluster).await;
        let lock = first.acquire("job", TTL).await.expect("acquire");
        // Decided at the quorum; let the remaining sets land before counting.
        first.settle().await;

        match second.try_acquire("job", TTL).await {
            Err(Error::NotAcquired {
                key,
                attempts: 1,
                shortfall,
                causes,
            }) => {
                assert_eq!(key, "job");
                assert_eq!(
                    shortfall,
                    Shortfall::TooFewVotes {
                        granted: 0,
                        needed: n / 2 + 1
                    }
                );
                assert_eq!(causes.len(), n);
                assert!(causes.iter().enumerate().all(|(i, c)| c.index == i));
            }
            other => panic!("n = {n}: expected NotAcquired, got {other:?}"),
        }
        // The holder's key is untouched.
        let on = holders(&cluster, "job", lock.token()).await;
        assert_eq!(on, (0..n).collect::<Vec<_>>(), "n = {n}");
        lock.release().await.expect("release");
    }
}

#[tokio::test]
async fn the_key_prefix_is_applied_in_redis_only() {
    let cluster = cluster(3);
    let locker = common::builder(&cluster)
        .key_prefix("locks:")
        .build()
        .await
        .unwrap();
    let lock = locker.acquire("job", TTL).await.unwrap();
    assert_eq!(lock.key(), "job");
    locker.settle().await;
    assert_eq!(
        holders(&cluster, "locks:job", lock.token()).await,
        [0, 1, 2]
    );
    assert_eq!(values(&cluster, "job").await, [None, None, None]);
    lock.release().await.unwrap();
}

#[tokio::test]
async fn release_after_the_lock_passed_to_another_owner_is_not_held_and_harmless() {
    for n in SIZES {
        let cluster = cluster(n);
        let first = locker(&cluster).await;
        let second = locker(&cluster).await;
        let stale = first.acquire("job", TTL).await.unwrap();
        first.settle().await;
        // Expire it behind its back, and let the second owner in.
        for i in 0..n {
            common::delete(&cluster, i, "job").await;
        }
        let current = second.acquire("job", TTL).await.unwrap();
        second.settle().await;

        match stale.release().await {
            Err(Error::NotHeld { key }) => assert_eq!(key, "job"),
            other => panic!("n = {n}: expected NotHeld, got {other:?}"),
        }
        first.settle().await;
        let on = holders(&cluster, "job", current.token()).await;
        assert_eq!(
            on,
            (0..n).collect::<Vec<_>>(),
            "n = {n}: the new owner's key survives"
        );
        let released = current.release().await.unwrap();
        assert!((1..=n).contains(&released), "n = {n}: released {released}");
        second.settle().await;
        assert_eq!(values(&cluster, "job").await, vec![None; n]);
    }
}

#[tokio::test]
async fn releasing_through_the_locker_is_the_same() {
    let cluster = cluster(2);
    let locker = locker(&cluster).await;
    let lock = locker.acquire("job", TTL).await.unwrap();
    assert!(lock.release().await.unwrap() >= 1);
    assert!(locker.try_acquire("job", TTL).await.is_ok());
}
