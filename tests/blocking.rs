//! `quorumlock::blocking` against real servers, from plain threads: locks
//! that contend, a watchdog that keeps a slow piece of work's lock, drops that
//! release before they return, and the refusal inside async code.

mod common;

use std::time::Duration;

use common::{builder, cluster, values};
use quorumlock::blocking::QuorumLocker;
use quorumlock::Error;

#[test]
fn plain_threads_contend_and_drops_release_at_once() {
    let cluster = cluster(3);
    let locker = QuorumLocker::build(builder(&cluster)).unwrap();
    let ttl = Duration::from_secs(10);

    let lock = locker.acquire("job", ttl).unwrap();
    let token = lock.token().to_string();
    std::thread::scope(|scope| {
        let other = locker.clone();
        let refused = scope
            .spawn(move || other.try_acquire("job", ttl))
            .join()
            .unwrap();
        assert!(
            matches!(refused, Err(Error::NotAcquired { .. })),
            "{refused:?}"
        );
    });
    assert!(lock.extend(ttl).unwrap() > Duration::from_secs(9));
    assert_eq!(
        locker.inspect("job").unwrap().holder(),
        Some(token.as_str())
    );
    drop(lock);
    // Released before `drop` returned: nothing to wait for.
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(values(&cluster, "job")), vec![None, None, None]);

    let guard = locker.acquire("job", ttl).unwrap().auto_extend().unwrap();
    assert!(guard.is_valid());
    drop(guard);
    assert_eq!(rt.block_on(values(&cluster, "job")), vec![None, None, None]);
}

#[test]
fn with_lock_keeps_a_slow_job_locked() {
    let cluster = cluster(3);
    let locker = QuorumLocker::build(builder(&cluster)).unwrap();
    let ttl = Duration::from_millis(300);
    let outcome = locker.with_lock("slow", ttl, |status| {
        // Longer than the TTL: only the watchdog's extends keep it.
        std::thread::sleep(Duration::from_millis(700));
        assert!(status.is_valid());
        "done"
    });
    assert_eq!(outcome.unwrap(), "done");
    assert!(locker.try_acquire("slow", ttl).is_ok());
    locker.settle().unwrap();
}

#[tokio::test]
async fn inside_a_runtime_it_refuses_rather_than_stall() {
    let cluster = cluster(1);
    assert!(matches!(
        QuorumLocker::build(builder(&cluster)),
        Err(Error::InsideRuntime)
    ));
    // A locker built outside, used inside.
    let locker = std::thread::scope(|scope| {
        scope
            .spawn(|| QuorumLocker::build(builder(&cluster)).unwrap())
            .join()
            .unwrap()
    });
    let ttl = Duration::from_secs(1);
    assert!(matches!(
        locker.acquire("job", ttl),
        Err(Error::InsideRuntime)
    ));
    // Dropped outside a runtime's thread: its runtime shuts down there.
    std::thread::scope(|scope| {
        scope.spawn(move || drop(locker));
    });
}
