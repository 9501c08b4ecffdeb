//! The lock's lifecycle simulated on in-memory instances under Tokio's paused
//! clock: the watchdog's schedule, loss detection, fast server clocks and the
//! validity arithmetic, to the exact millisecond.

mod common;

use std::time::Duration;

use quorumlock::{Error, MemoryInstance, QuorumLocker};
use tokio::time::Instant;

const TTL: Duration = Duration::from_millis(3000);

fn instances(n: usize) -> Vec<MemoryInstance> {
    common::memory_instances(n)
}

/// A locker that has measured every instance (`prepare`), so that the tests'
/// timings start at the first attempt.
async fn locker(instances: &[MemoryInstance]) -> QuorumLocker {
    let locker = common::memory_builder(instances).build().await.unwrap();
    locker.prepare().await.unwrap();
    locker
}

fn commands(instances: &[MemoryInstance]) -> u64 {
    instances.iter().map(MemoryInstance::commands).sum()
}

#[tokio::test(start_paused = true)]
async fn the_watchdog_extends_every_third_of_the_ttl_and_stops_with_the_work() {
    let set = instances(3);
    let locker = locker(&set).await;
    let before = commands(&set);
    let token = locker
        .with_lock("job", TTL, |status| async move {
            // Ends between two extends, not at the instant of one.
            tokio::time::sleep(TTL * 5 + TTL / 6).await;
            assert!(status.is_valid());
            status.token().to_string()
        })
        .await
        .unwrap();
    // One set and one release per instance, and an extend per instance every
    // TTL / 3 for 5 TTLs: 15 rounds.
    let per_instance = (commands(&set) - before) / 3;
    assert_eq!(per_instance, 1 + 15 + 1, "{per_instance}");
    locker.settle().await;
    for instance in &set {
        assert_eq!(instance.keys(), Vec::<String>::new(), "{token}");
    }
    let after = commands(&set);
    tokio::time::sleep(TTL * 3).await;
    assert_eq!(commands(&set), after, "the watchdog stopped with the work");
}

#[tokio::test(start_paused = true)]
async fn a_loss_is_noticed_at_the_next_extend_and_cancels_the_work() {
    let set = instances(3);
    let locker = locker(&set).await;
    let started = Instant::now();
    let saboteur = {
        let set = set.clone();
        tokio::spawn(async move {
            // Between two extends: the first is at TTL / 3.
            tokio::time::sleep(TTL / 2).await;
            set[0].remove("job");
            set[1].remove("job");
            Instant::now()
        })
    };
    let result = locker
        .with_lock("job", TTL, |_| async {
            tokio::time::sleep(TTL * 10).await;
        })
        .await;
    let cancelled = Instant::now();
    let removed = saboteur.await.unwrap();
    match result {
        Err(Error::LockLost {
            source: Some(cause),
            ..
        }) => assert!(matches!(*cause, Error::NotExtended { .. }), "{cause}"),
        other => panic!("{other:?}"),
    }
    // The next extend was due at 2 × TTL / 3; it found the loss at once.
    assert_eq!(cancelled - started, TTL * 2 / 3);
    assert_eq!(cancelled - removed, TTL * 2 / 3 - TTL / 2);
    locker.settle().await;
    assert!(set.iter().all(|instance| instance.keys().is_empty()));
}

/// Two of three servers run four times fast: the keys there live TTL / 4. With
/// plain Redlock validity a rival gets in while the lock is still valid by our
/// clock, and the loss shows only at the first extend, at TTL / 3. With the
/// defaults the granting set's clock bounds end the validity before TTL / 4,
/// and the watchdog extends at half the validity (not at TTL / 3, past it): the
/// lock is kept, and the rival never gets in.
#[tokio::test(start_paused = true)]
async fn fast_server_clocks_keep_a_rival_out_and_the_lock_kept() {
    for rate_aware in [false, true] {
        let set = instances(3);
        set[0].set_clock_rate(4.0).unwrap();
        set[1].set_clock_rate(4.0).unwrap();
        let locker = common::memory_builder(&set)
            .rate_aware_validity(rate_aware)
            .build()
            .await
            .unwrap();
        let rival = self::locker(&set).await;
        locker.prepare().await.unwrap();
        let started = Instant::now();
        let overlap = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let result = locker
            .with_lock("job", TTL, |status| {
                let (rival, overlap) = (rival.clone(), std::sync::Arc::clone(&overlap));
                async move {
                    // Past TTL / 4, where the fast servers drop an unextended key.
                    tokio::time::sleep(TTL * 3 / 10).await;
                    let Ok(theirs) = rival.try_acquire("job", TTL).await else {
                        return "kept";
                    };
                    overlap.store(status.is_valid(), std::sync::atomic::Ordering::SeqCst);
                    std::mem::forget(theirs);
                    tokio::time::sleep(TTL * 10).await;
                    "stolen"
                }
            })
            .await;
        if rate_aware {
            assert_eq!(result.unwrap(), "kept");
        } else {
            // Plain Redlock: still valid by our clock when the rival got in,
            // noticed at the first extend.
            assert!(matches!(result, Err(Error::LockLost { .. })), "{result:?}");
            assert!(overlap.load(std::sync::atomic::Ordering::SeqCst));
            assert_eq!(Instant::now() - started, TTL / 3);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_inconclusive_extend_is_retried_while_validity_is_left() {
    let set = instances(3);
    let locker = locker(&set).await;
    let stalls = {
        let set = set.clone();
        tokio::spawn(async move {
            // Two of three stall across the first extend, for less than the
            // validity: the watchdog must not give up on the first time-out.
            tokio::time::sleep(TTL / 3 - Duration::from_millis(10)).await;
            set[0].pause();
            set[1].pause();
            tokio::time::sleep(TTL / 3).await;
            set[0].resume();
            set[1].resume();
        })
    };
    let done = locker
        .with_lock("job", TTL, |status| async move {
            tokio::time::sleep(TTL * 2).await;
            status.is_valid()
        })
        .await
        .expect("the lock survived the stall");
    assert!(done);
    stalls.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn unreachable_instances_lose_the_lock_when_its_validity_runs_out() {
    let set = instances(3);
    let locker = locker(&set).await;
    let lock = locker.acquire("job", TTL).await.unwrap();
    let valid_until = lock.valid_until();
    let guard = lock.auto_extend().unwrap();
    set[1].set_failing(true);
    set[2].set_failing(true);
    guard.lost().await;
    // Extends kept failing without a refusal, so the lock held on to the end of
    // its validity, and not a moment longer.
    assert!(Instant::now() <= valid_until);
    assert!(!guard.is_valid());
    drop(guard);
    set[1].set_failing(false);
    set[2].set_failing(false);
    locker.settle().await;
}

#[tokio::test(start_paused = true)]
async fn validity_is_ttl_minus_round_trip_minus_drift() {
    let set = instances(3);
    for instance in &set {
        instance.set_latency(Duration::from_millis(10));
    }
    // The plain arithmetic; the clock bounds' share is in `tests/defences.rs`.
    let locker = common::memory_builder(&set)
        .rate_aware_validity(false)
        .build()
        .await
        .unwrap();
    locker.prepare().await.unwrap();
    let drift = TTL.mul_f64(quorumlock::DEFAULT_DRIFT_FACTOR) + Duration::from_millis(2);
    let lock = locker.acquire("job", TTL).await.unwrap();
    assert_eq!(lock.valid_until() - lock.acquired_at(), TTL - drift);
    assert_eq!(lock.remaining(), TTL - drift - Duration::from_millis(10));

    tokio::time::sleep(Duration::from_millis(500)).await;
    let extend_started = Instant::now();
    let validity = lock.extend(TTL * 2).await.unwrap();
    let drift = (TTL * 2).mul_f64(quorumlock::DEFAULT_DRIFT_FACTOR) + Duration::from_millis(2);
    assert_eq!(validity, TTL * 2 - Duration::from_millis(10) - drift);
    assert_eq!(lock.valid_until(), extend_started + TTL * 2 - drift);
    assert_eq!(lock.ttl(), TTL * 2);
    assert_eq!(set[0].pttl("job"), Some(TTL * 2 - Duration::from_millis(5)));
    lock.release().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_dropped_lock_is_released_once_instances_answer_again() {
    let set = instances(3);
    let locker = locker(&set).await;
    let lock = locker.acquire("job", TTL).await.unwrap();
    set[0].set_failing(true);
    set[1].set_failing(true);
    drop(lock);
    tokio::time::sleep(TTL / 3).await;
    assert!(set[0].get("job").is_some(), "not released while failing");
    set[0].set_failing(false);
    set[1].set_failing(false);
    locker.settle().await;
    assert!(set.iter().all(|instance| instance.keys().is_empty()));
}

#[tokio::test(start_paused = true)]
async fn an_inconclusive_extend_warns_before_the_loss() {
    let set = instances(3);
    let locker = locker(&set).await;
    let guard = locker
        .acquire("job", TTL)
        .await
        .unwrap()
        .auto_extend()
        .unwrap();
    let status = guard.status();
    assert!(!status.is_at_risk());
    set[1].set_failing(true);
    set[2].set_failing(true);
    // The first extend that cannot get through: at risk, validity left.
    status.at_risk().await;
    assert!(status.is_at_risk());
    assert!(status.is_valid());
    let warned_at = Instant::now();
    assert!(guard.valid_until() > warned_at);
    // The instances come back before the validity runs out: the next retry
    // renews the lock and the warning is lifted.
    set[1].set_failing(false);
    set[2].set_failing(false);
    tokio::time::sleep(TTL / 6).await;
    assert!(
        !status.is_at_risk(),
        "still at risk after a successful extend"
    );
    assert!(status.is_valid());
    guard.release().await.unwrap();
    assert!(!status.is_at_risk(), "a released lock is lost, not at risk");
    locker.settle().await;
}

#[tokio::test(start_paused = true)]
async fn a_bounded_hold_ends_work_that_never_finishes() {
    let set = instances(3);
    let locker = locker(&set).await;
    let started = Instant::now();
    let max_hold = Duration::from_secs(10);
    let outcome = locker
        .lock("job")
        .ttl(TTL)
        .max_hold(max_hold)
        .with_lock(|_status| std::future::pending::<()>())
        .await;
    assert!(
        matches!(outcome, Err(Error::LockLost { .. })),
        "{outcome:?}"
    );
    // Extended up to the bound, then let lapse within one more TTL.
    let held = started.elapsed();
    assert!(held >= max_hold && held <= max_hold + TTL, "{held:?}");
    // Another owner can take it now.
    let next = locker.try_acquire("job", TTL).await.unwrap();
    next.release().await.unwrap();
    locker.settle().await;
}
