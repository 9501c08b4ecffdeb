//! Partial grants, dead and paused instances, exhausted validity, contention: the
//! attempt decides at the quorum and leaves no token of a lost attempt behind.

mod common;

use std::sync::Arc;

use std::time::Duration;
use tokio::sync::Mutex;

use common::{builder, cluster, holders, locker, set, values, SIZES};
use quorumlock::{Error, LockValue, Shortfall, Vote};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(30);

/// Every subset of 5 instances pre-held by another owner: the attempt wins exactly
/// when the free instances reach the quorum; when it loses, none of its tokens is
/// left anywhere, and the other owner's keys are untouched either way.
#[tokio::test]
async fn every_subset_of_pre_held_instances() {
    let cluster = cluster(5);
    let locker = locker(&cluster).await;
    for held in 0u32..32 {
        let key = format!("subset-{held}");
        let taken: Vec<usize> = (0..5).filter(|i| held & (1 << i) != 0).collect();
        for &i in &taken {
            set(&cluster, i, &key, "other-owner").await;
        }
        let free = 5 - taken.len();
        match locker.try_acquire(&key, TTL).await {
            Ok(lock) => {
                assert!(free >= 3, "{taken:?}: won with {free} free");
                locker.settle().await;
                let on = holders(&cluster, &key, lock.token()).await;
                assert_eq!(
                    on,
                    (0..5).filter(|i| !taken.contains(i)).collect::<Vec<_>>()
                );
                lock.release().await.unwrap();
            }
            Err(Error::NotAcquired {
                shortfall, causes, ..
            }) => {
                assert!(free < 3, "{taken:?}: lost with {free} free");
                // Decided as soon as a quorum was out of reach: some instances may
                // not have been heard from yet.
                match shortfall {
                    Shortfall::TooFewVotes { granted, needed: 3 } => assert!(granted <= free),
                    other => panic!("{taken:?}: {other:?}"),
                }
                for &i in &taken {
                    let vote = &causes[i].vote;
                    assert!(matches!(vote, Vote::Refused | Vote::Unanswered), "{vote:?}");
                }
            }
            Err(other) => panic!("{taken:?}: {other}"),
        }
        locker.settle().await;
        let expected: Vec<_> = (0..5)
            .map(|i| taken.contains(&i).then(|| "other-owner".to_string()))
            .collect();
        assert_eq!(values(&cluster, &key).await, expected, "{taken:?}");
    }
}

/// Another owner on 2 of 5 and one of the free ones paused: only 2 votes are left,
/// so the attempt is lost, and the grants it did collect are rolled back —
/// including on the paused instance once it resumes.
#[tokio::test]
async fn partial_grant_is_rolled_back_everywhere() {
    let mut cluster = cluster(5);
    let locker = builder(&cluster)
        .instance_timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    locker.prepare().await.unwrap();
    set(&cluster, 0, "job", "other-owner").await;
    set(&cluster, 1, "job", "other-owner").await;
    cluster.pause(4).unwrap();

    let err = locker.try_acquire("job", TTL).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::NotAcquired {
                shortfall: Shortfall::TooFewVotes {
                    granted: 2,
                    needed: 3
                },
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(err.causes()[4].vote, Vote::TimedOut(_)), "{err}");
    assert_eq!(err.unreachable_instances(), 1, "{err}");

    cluster.resume(4).unwrap();
    locker.settle().await;
    let expected = [
        Some("other-owner".to_string()),
        Some("other-owner".to_string()),
        None,
        None,
        None,
    ];
    assert_eq!(values(&cluster, "job").await, expected);
}

#[tokio::test]
async fn one_of_five_killed_still_acquires() {
    let mut cluster = cluster(5);
    let locker = locker(&cluster).await;
    cluster.kill(2).unwrap();
    let lock = locker
        .acquire("job", TTL)
        .await
        .expect("a majority is alive");
    let on = holders(&cluster, "job", lock.token()).await;
    assert!(on.len() >= 3 && !on.contains(&2), "{on:?}");
    lock.release().await.unwrap();
    locker.settle().await;
}

/// A paused instance never answers; the attempt must not wait for it. With a
/// per-instance timeout of 10 s, returning sooner shows the decision came from the
/// other four.
#[tokio::test]
async fn one_of_five_paused_still_acquires_without_waiting_for_it() {
    let mut cluster = cluster(5);
    let timeout = Duration::from_secs(10);
    let locker = builder(&cluster)
        .instance_timeout(timeout)
        .build()
        .await
        .unwrap();
    locker.prepare().await.unwrap();
    cluster.pause(3).unwrap();

    let started = Instant::now();
    let lock = locker
        .try_acquire("job", TTL)
        .await
        .expect("four instances answer");
    assert!(
        started.elapsed() < timeout,
        "waited for the paused instance"
    );
    let released = lock.release().await.unwrap();
    assert!(released >= 3, "released {released}");
    assert!(
        started.elapsed() < timeout,
        "release waited for the paused instance"
    );

    // Once it resumes, the set queued on it is undone by the release queued behind.
    cluster.resume(3).unwrap();
    locker.settle().await;
    assert_eq!(values(&cluster, "job").await, vec![None; 5]);
}

/// A quorum that grants later than the TTL leaves no validity: the attempt is lost
/// with `ValidityExhausted` and its grants are rolled back.
#[tokio::test]
async fn exhausted_validity_rolls_back() {
    let cluster = Arc::new(Mutex::new(cluster(3)));
    let locker = {
        let cluster = cluster.lock().await;
        // All three must grant, so the paused one decides when the quorum is reached.
        builder(&cluster).quorum(3).build().await.unwrap()
    };
    locker.prepare().await.unwrap();
    cluster.lock().await.pause(2).unwrap();
    let resumer = {
        let cluster = Arc::clone(&cluster);
        tokio::spawn(async move {
            // Longer than the TTL below: the grant arrives after it.
            tokio::time::sleep(Duration::from_millis(300)).await;
            cluster.lock().await.resume(2).unwrap();
        })
    };

    let err = locker
        .try_acquire("job", Duration::from_millis(100))
        .await
        .unwrap_err();
    resumer.await.unwrap();
    match err {
        Error::NotAcquired {
            shortfall: Shortfall::ValidityExhausted { elapsed },
            ..
        } => {
            assert!(elapsed >= Duration::from_millis(100), "{elapsed:?}")
        }
        other => panic!("expected ValidityExhausted, got {other}"),
    }
    locker.settle().await;
    let cluster = cluster.lock().await;
    assert_eq!(values(&cluster, "job").await, [None, None, None]);
}

/// Two lockers (separate connections) race for one key: exactly one wins, the
/// other gives up at its acquire timeout.
#[tokio::test]
async fn two_lockers_contend_and_exactly_one_wins() {
    for n in SIZES {
        let cluster = cluster(n);
        let a = builder(&cluster)
            .default_wait(Duration::from_millis(600))
            .build()
            .await
            .unwrap();
        let b = builder(&cluster)
            .default_wait(Duration::from_millis(600))
            .build()
            .await
            .unwrap();
        let (ra, rb) = tokio::join!(a.acquire("job", TTL), b.acquire("job", TTL));
        let (winner, loser) = match (ra, rb) {
            (Ok(lock), Err(err)) | (Err(err), Ok(lock)) => (lock, err),
            (ra, rb) => panic!("n = {n}: expected one winner, got {ra:?} and {rb:?}"),
        };
        assert!(matches!(loser, Error::NotAcquired { .. }), "{loser}");
        a.settle().await;
        b.settle().await;
        // The winner holds a quorum; the loser's rolled-back token is nowhere.
        let on = holders(&cluster, "job", winner.token()).await;
        assert!(on.len() > n / 2, "n = {n}: winner holds {on:?}");
        for value in values(&cluster, "job").await.into_iter().flatten() {
            let owner = LockValue::parse(&value).map(|value| value.token);
            assert_eq!(owner, Some(winner.token()), "n = {n}");
        }
        winner.release().await.unwrap();
    }
}

/// At N = 2 two simultaneous attempts can split the vote one each; both must
/// return (lost), never hang, never both win, and leave nothing behind.
#[tokio::test]
async fn split_votes_at_even_n_never_hang_or_leak() {
    let cluster = cluster(2);
    let a = locker(&cluster).await;
    let b = locker(&cluster).await;
    let mut winners = [0usize; 3];
    for round in 0..200 {
        let key = format!("split-{round}");
        let (ra, rb) = tokio::join!(a.try_acquire(&key, TTL), b.try_acquire(&key, TTL));
        assert!(!(ra.is_ok() && rb.is_ok()), "round {round}: both won");
        winners[usize::from(ra.is_ok()) + 2 * usize::from(rb.is_ok()) % 3] += 1;
        for lock in [ra, rb].into_iter().flatten() {
            lock.release().await.unwrap();
        }
    }
    a.settle().await;
    b.settle().await;
    assert_eq!(
        common::total_keys(&cluster).await,
        0,
        "winners: {winners:?}"
    );
}

/// With every instance down, `acquire` gives up at its timeout with every
/// instance's failure, told apart from contention.
#[tokio::test]
async fn all_instances_down_is_not_acquired_with_every_failure() {
    let mut cluster = cluster(3);
    let locker = builder(&cluster)
        .default_wait(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    for i in 0..3 {
        cluster.kill(i).unwrap();
    }
    let err = locker.acquire("job", TTL).await.unwrap_err();
    assert!(matches!(err, Error::NotAcquired { .. }), "{err}");
    assert_eq!(err.unreachable_instances(), 3, "{err}");
    locker.settle().await;
}
