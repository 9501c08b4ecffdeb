//! Dropping an `acquire` future at any await point leaves no key behind: the
//! attempt in flight is rolled back in the background.

mod common;

use std::future::{poll_fn, Future};
use std::task::Poll;
use std::time::Duration;

use common::{builder, cluster, total_keys};

const TTL: Duration = Duration::from_secs(30);

/// Polls `future` up to `polls` times, letting the runtime drive I/O between
/// polls, then drops it: a drop point counted in await points, not in time.
async fn poll_then_drop<F: Future>(future: F, polls: usize) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    for _ in 0..polls {
        if let Poll::Ready(output) = poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await {
            return Some(output);
        }
        tokio::task::yield_now().await;
    }
    None
}

#[tokio::test]
async fn acquires_dropped_at_every_await_point_leave_no_key() {
    for n in [1, 3, 5] {
        let cluster = cluster(n);
        let locker = builder(&cluster).build().await.unwrap();
        locker.prepare().await.unwrap();
        let (mut dropped, mut won) = (0, 0);
        for i in 0..400usize {
            let key = format!("cancel-{i}");
            // 0 polls: dropped before the sets leave; then while replies arrive.
            match poll_then_drop(locker.acquire(&key, TTL), i % 12).await {
                Some(result) => {
                    won += 1;
                    result.unwrap().release().await.unwrap();
                }
                None => dropped += 1,
            }
        }
        locker.settle().await;
        assert!(
            dropped > 0 && won > 0,
            "n = {n}: dropped {dropped}, won {won}"
        );
        assert_eq!(
            total_keys(&cluster).await,
            0,
            "n = {n}: dropped {dropped}, won {won}"
        );
    }
}

/// Attempts that lost to a held lock and were dropped while sleeping before a
/// retry, or mid-attempt, leave nothing either; the holder's key survives.
#[tokio::test]
async fn contended_acquires_dropped_mid_retry_leave_only_the_holder() {
    let cluster = cluster(3);
    let holder = builder(&cluster).build().await.unwrap();
    let waiter = builder(&cluster).build().await.unwrap();
    let lock = holder.acquire("busy", TTL).await.unwrap();
    holder.settle().await;
    for i in 0..40u64 {
        let wait = Duration::from_millis(1 + (i * 37) % 200);
        let attempt = waiter.acquire("busy", TTL);
        assert!(
            tokio::time::timeout(wait, attempt).await.is_err(),
            "took a held lock"
        );
    }
    waiter.settle().await;
    assert_eq!(
        total_keys(&cluster).await,
        3,
        "only the holder's key on each instance"
    );
    assert_eq!(
        common::holders(&cluster, "busy", lock.token()).await,
        [0, 1, 2]
    );
    lock.release().await.unwrap();
}

/// With one instance paused the set sent to it stays queued; once it resumes, the
/// rollback queued behind it removes the key.
#[tokio::test]
async fn dropped_acquires_with_a_paused_instance_leave_no_key() {
    let mut cluster = cluster(3);
    let locker = builder(&cluster).build().await.unwrap();
    locker.prepare().await.unwrap();
    cluster.pause(1).unwrap();
    let mut dropped = 0;
    for i in 0..60usize {
        let key = format!("cancel-paused-{i}");
        match poll_then_drop(locker.acquire(&key, TTL), i % 12).await {
            Some(result) => result.unwrap().release().await.map(drop).unwrap(),
            None => dropped += 1,
        }
    }
    assert!(dropped > 0);
    cluster.resume(1).unwrap();
    locker.settle().await;
    assert_eq!(total_keys(&cluster).await, 0, "dropped {dropped}");
}
