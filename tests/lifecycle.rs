//! The lock's life after acquisition, against real servers: extend, the
//! auto-extend watchdog, loss notification, release on drop, caller-chosen tokens
//! and metadata.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{cluster, delete, holders, values};
use quorumlock::testing::RedisCluster;
use quorumlock::{Error, LockValue, QuorumLocker, Shortfall};
use redis::AsyncCommands;
use tokio::time::Instant;

/// Short enough that outliving it a few times keeps the tests quick; long enough
/// that a loaded machine extends well within it.
const TTL: Duration = Duration::from_millis(900);

async fn locker(cluster: &RedisCluster) -> QuorumLocker {
    common::builder(cluster)
        .instance_timeout(Duration::from_millis(200))
        .build()
        .await
        .expect("build locker")
}

/// Milliseconds left on `key` on each instance (`None` where absent).
async fn pttls(cluster: &RedisCluster, key: &str) -> Vec<Option<u64>> {
    let mut ttls = Vec::new();
    for i in 0..cluster.len() {
        let mut connection = cluster.connection(i).await.unwrap();
        let ttl: i64 = connection.pttl(key).await.unwrap();
        ttls.push(u64::try_from(ttl).ok());
    }
    ttls
}

#[tokio::test]
async fn extend_keeps_a_lock_past_its_first_ttl() {
    let cluster = cluster(3);
    let locker = locker(&cluster).await;
    let rival = self::locker(&cluster).await;
    let lock = locker.acquire("job", TTL).await.unwrap();
    let first_deadline = lock.valid_until();
    let ends = Instant::now() + TTL * 3;
    let mut extends = 0;
    while Instant::now() < ends {
        tokio::time::sleep(TTL / 3).await; // the work between extends
        let validity = lock.extend(TTL).await.expect("extend");
        extends += 1;
        assert!(validity > Duration::ZERO && validity <= TTL);
        assert!(lock.is_valid());
        assert!(
            rival.try_acquire("job", TTL).await.is_err(),
            "still exclusive"
        );
    }
    assert!(lock.valid_until() > first_deadline + TTL);
    assert!(extends >= 6, "{extends}");
    assert_eq!(holders(&cluster, "job", lock.token()).await.len(), 3);
    lock.release().await.unwrap();
}

#[tokio::test]
async fn extend_after_expiry_fails_and_leaves_the_new_owner_alone() {
    let cluster = cluster(3);
    let locker = locker(&cluster).await;
    let rival = self::locker(&cluster).await;
    let lock = locker
        .acquire("job", Duration::from_millis(200))
        .await
        .unwrap();
    lock.lost().await;
    assert!(!lock.is_valid());
    let theirs = rival.acquire("job", TTL).await.unwrap();
    let before = values(&cluster, "job").await;

    match lock.extend(TTL).await {
        Err(Error::LockLost { key, source: None }) => assert_eq!(key, "job"),
        other => panic!("{other:?}"),
    }
    assert_eq!(values(&cluster, "job").await, before);
    assert!(pttls(&cluster, "job")
        .await
        .iter()
        .all(|ttl| ttl.unwrap() <= TTL.as_millis() as u64));
    drop(lock); // its release must not touch the new owner's keys either
    locker.settle().await;
    assert_eq!(holders(&cluster, "job", theirs.token()).await.len(), 3);
    theirs.release().await.unwrap();
}

#[tokio::test]
async fn extend_refused_by_a_majority_loses_the_lock_without_deleting() {
    let cluster = cluster(3);
    let locker = locker(&cluster).await;
    let lock = locker.acquire("job", TTL).await.unwrap();
    locker.settle().await;
    // Gone behind its back on two of three, as after an expiry.
    delete(&cluster, 0, "job").await;
    delete(&cluster, 1, "job").await;
    match lock.extend(TTL).await {
        Err(Error::NotExtended {
            // Decided at the second refusal; instance 2 may not have answered yet.
            shortfall:
                Shortfall::TooFewVotes {
                    granted: 0 | 1,
                    needed: 2,
                },
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(!lock.is_valid(), "a failed extend loses the lock");
    tokio::time::timeout(Duration::from_secs(1), lock.lost())
        .await
        .expect("lost() resolves at once");
    assert_eq!(
        holders(&cluster, "job", lock.token()).await,
        vec![2],
        "extend deletes nothing"
    );
    // A lost lock stays lost: no further extend is sent.
    assert!(matches!(
        lock.extend(TTL).await,
        Err(Error::LockLost { .. })
    ));
    lock.release().await.unwrap();
    locker.settle().await;
    assert_eq!(values(&cluster, "job").await, vec![None; 3]);
}

#[tokio::test]
async fn an_invalid_ttl_keeps_the_lock() {
    let cluster = cluster(1);
    let locker = locker(&cluster).await;
    let lock = locker.acquire("job", TTL).await.unwrap();
    assert!(matches!(
        lock.extend(Duration::ZERO).await,
        Err(Error::InvalidTtl { .. })
    ));
    assert!(lock.is_valid());
    lock.extend(TTL).await.unwrap();
    lock.release().await.unwrap();
}

#[tokio::test]
async fn with_lock_keeps_the_lock_for_five_ttls_and_releases_after() {
    let cluster = cluster(3);
    let locker = locker(&cluster).await;
    let rival = self::locker(&cluster).await;
    let started = Instant::now();
    let tokens = locker
        .with_lock("job", TTL, |status| {
            let rival = rival.clone();
            async move {
                let mut refused = 0;
                while started.elapsed() < TTL * 5 {
                    tokio::time::sleep(TTL / 4).await; // work
                    assert!(status.is_valid());
                    assert!(rival.try_acquire("job", TTL).await.is_err());
                    refused += 1;
                }
                (status.token().to_string(), refused)
            }
        })
        .await
        .expect("the work ran to its end");
    assert!(tokens.1 >= 15, "{}", tokens.1);
    locker.settle().await;
    assert_eq!(values(&cluster, "job").await, vec![None; 3], "released");

    // The watchdog stopped with the work: nothing extends or sets the key again.
    let before = script_calls(&cluster).await;
    tokio::time::sleep(TTL).await; // three watchdog intervals, had it survived
    assert_eq!(script_calls(&cluster).await, before);
}

/// Instance 0's counts of script calls (extends and releases).
async fn script_calls(cluster: &RedisCluster) -> Vec<String> {
    let mut connection = cluster.connection(0).await.unwrap();
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await
        .unwrap();
    stats
        .lines()
        .filter(|line| line.starts_with("cmdstat_evalsha") || line.starts_with("cmdstat_eval:"))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn losing_the_lock_cancels_the_work() {
    let cluster = cluster(3);
    let locker = locker(&cluster).await;
    let ttl = Duration::from_millis(3000);
    let deleted_at = Arc::new(tokio::sync::OnceCell::new());
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let cluster = Arc::new(cluster);
    let saboteur = {
        let cluster = Arc::clone(&cluster);
        let deleted_at = Arc::clone(&deleted_at);
        tokio::spawn(async move {
            let _ = started_rx.await;
            // Behind the holder's back, on a majority.
            delete(&cluster, 0, "job").await;
            delete(&cluster, 2, "job").await;
            deleted_at.set(Instant::now()).unwrap();
        })
    };
    let reached_end = Arc::new(AtomicU32::new(0));
    let result = locker
        .with_lock("job", ttl, |_status| {
            let reached_end = Arc::clone(&reached_end);
            async move {
                started_tx.send(()).unwrap();
                tokio::time::sleep(ttl * 10).await;
                reached_end.fetch_add(1, Ordering::SeqCst);
            }
        })
        .await;
    let cancelled_at = Instant::now();
    saboteur.await.unwrap();
    match result {
        Err(Error::LockLost {
            key,
            source: Some(cause),
        }) => {
            assert_eq!(key, "job");
            assert!(matches!(*cause, Error::NotExtended { .. }), "{cause}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        reached_end.load(Ordering::SeqCst),
        0,
        "the work was dropped"
    );
    let after = cancelled_at - *deleted_at.get().unwrap();
    // The next extend (every ttl/3) finds the loss; long before the validity ends.
    assert!(after <= ttl / 3 + Duration::from_millis(500), "{after:?}");
    println!(
        "loss to cancellation: {after:?} (extend interval {:?})",
        ttl / 3
    );
    locker.settle().await;
    assert_eq!(values(&cluster, "job").await, vec![None; 3]);
}

#[tokio::test]
async fn with_lock_releases_after_an_error_and_after_a_panic() {
    let cluster = cluster(3);
    let locker = locker(&cluster).await;
    let failed: Result<Result<(), &str>, Error> = locker
        .with_lock("job", TTL, |_| async { Err("the work failed") })
        .await;
    assert_eq!(failed.unwrap(), Err("the work failed"));
    locker.settle().await;
    assert_eq!(values(&cluster, "job").await, vec![None; 3]);

    let panicking = locker.clone();
    let panicked = tokio::spawn(async move {
        panicking
            .with_lock("job", TTL, |_| async { panic!("the work panicked") })
            .await
    })
    .await;
    assert!(panicked.unwrap_err().is_panic());
    locker.settle().await;
    assert_eq!(values(&cluster, "job").await, vec![None; 3]);
}

#[tokio::test]
async fn dropped_locks_and_guards_release_in_the_background() {
    let cluster = cluster(3);
    let locker = locker(&cluster).await;
    let lock = locker.acquire("plain", TTL).await.unwrap();
    let guard = locker
        .acquire("guarded", TTL)
        .await
        .unwrap()
        .auto_extend()
        .unwrap();
    let status = guard.status();
    assert_eq!(holders(&cluster, "plain", lock.token()).await.len(), 3);
    drop(lock);
    drop(guard);
    assert!(
        !status.is_valid(),
        "a dropped guard's lock is no longer ours"
    );
    locker.settle().await;
    assert_eq!(values(&cluster, "plain").await, vec![None; 3]);
    assert_eq!(values(&cluster, "guarded").await, vec![None; 3]);
}

#[tokio::test]
async fn a_dropped_lock_keeps_trying_to_release_while_instances_are_paused() {
    let mut cluster = cluster(3);
    let locker = locker(&cluster).await;
    let lock = locker
        .acquire("job", Duration::from_secs(20))
        .await
        .unwrap();
    locker.settle().await;
    cluster.pause(0).unwrap();
    cluster.pause(1).unwrap();
    match lock.release().await {
        // Only instance 2 answered: the lock is released there alone…
        Ok(1) | Err(Error::Unavailable { .. }) => {}
        other => panic!("{other:?}"),
    }
    cluster.resume(0).unwrap();
    cluster.resume(1).unwrap();
    tokio::time::timeout(Duration::from_secs(10), locker.settle())
        .await
        .expect("the background release finishes");
    // …and the rest once the instances answer again.
    assert_eq!(values(&cluster, "job").await, vec![None; 3]);
}

#[tokio::test]
async fn lost_resolves_when_the_validity_runs_out() {
    let cluster = cluster(1);
    let locker = locker(&cluster).await;
    let lock = locker
        .acquire("job", Duration::from_millis(300))
        .await
        .unwrap();
    let status = lock.status();
    tokio::time::timeout(Duration::from_secs(2), status.lost())
        .await
        .expect("lost at the end of the validity");
    assert!(Instant::now() >= lock.valid_until());
    assert!(!lock.is_valid());
    assert_eq!(lock.remaining(), Duration::ZERO);
}

/// The token and metadata in `job`'s value on each instance.
async fn owners(cluster: &RedisCluster) -> Vec<Option<(String, Option<String>)>> {
    values(cluster, "job")
        .await
        .into_iter()
        .map(|value| {
            let value = value?;
            let parsed = LockValue::parse(&value)?;
            Some((
                parsed.token.to_string(),
                parsed.metadata.map(str::to_string),
            ))
        })
        .collect()
}

#[tokio::test]
async fn a_restarted_process_retakes_its_lock_by_its_own_token() {
    let cluster = cluster(3);
    let before_restart = locker(&cluster).await;
    let lock = before_restart
        .lock("job")
        .ttl(TTL)
        .token("host-a:job-17")
        .metadata("pid=100")
        .try_acquire()
        .await
        .unwrap();
    assert_eq!(lock.token(), "host-a:job-17");
    assert_eq!(lock.metadata(), Some("pid=100"));
    before_restart.settle().await; // the third set may land after the decision
    assert_eq!(
        owners(&cluster).await,
        vec![Some(("host-a:job-17".to_string(), Some("pid=100".to_string()))); 3],
        "metadata is stored beside the token"
    );
    std::mem::forget(lock); // the process dies without releasing

    let after_restart = locker(&cluster).await;
    let other = after_restart
        .lock("job")
        .ttl(TTL)
        .token("host-b:job-17")
        .try_acquire()
        .await;
    assert!(matches!(other, Err(Error::NotAcquired { .. })), "{other:?}");
    let retaken = after_restart
        .lock("job")
        .ttl(TTL)
        .token("host-a:job-17")
        .metadata("pid=200")
        .try_acquire()
        .await
        .expect("the same token takes it back");
    after_restart.settle().await;
    assert_eq!(
        owners(&cluster).await,
        vec![Some(("host-a:job-17".to_string(), Some("pid=200".to_string()))); 3]
    );
    retaken.release().await.unwrap();
    after_restart.settle().await;
    assert_eq!(values(&cluster, "job").await, vec![None; 3]);
}

#[tokio::test]
async fn bad_tokens_and_metadata_are_refused_before_any_request() {
    let cluster = cluster(1);
    let locker = locker(&cluster).await;
    let too_long_token = "t".repeat(quorumlock::MAX_TOKEN_LEN + 1);
    let too_long_metadata = "m".repeat(quorumlock::MAX_METADATA_LEN + 1);
    for (token, metadata, setting) in [
        (Some(""), None, "token"),
        (Some("has space"), None, "token"),
        (Some("tab\there"), None, "token"),
        (Some("naïve"), None, "token"),
        (Some(too_long_token.as_str()), None, "token"),
        (None, Some(too_long_metadata.as_str()), "metadata"),
    ] {
        let mut request = locker.lock("job").ttl(TTL);
        if let Some(token) = token {
            request = request.token(token);
        }
        if let Some(metadata) = metadata {
            request = request.metadata(metadata);
        }
        match request.try_acquire().await {
            Err(Error::InvalidConfig { setting: got, .. }) => assert_eq!(got, setting),
            other => panic!("{token:?} {metadata:?}: {other:?}"),
        }
    }
    assert_eq!(common::total_keys(&cluster).await, 0);
}

#[tokio::test]
async fn an_auto_extend_interval_must_fit_in_the_validity() {
    let cluster = cluster(1);
    let locker = locker(&cluster).await;
    for every in [Duration::ZERO, TTL, TTL * 2] {
        let lock = locker.acquire("job", TTL).await.unwrap();
        match lock.auto_extend_every(every) {
            Err(Error::InvalidConfig {
                setting: "auto_extend_every",
                ..
            }) => {}
            other => panic!("{every:?}: {other:?}"),
        }
        // The refused lock was dropped and released.
        locker.settle().await;
        assert_eq!(values(&cluster, "job").await, vec![None]);
    }
}
