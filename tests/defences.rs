//! The defences plain Redlock lacks, on in-memory instances under Tokio's paused
//! clock: restart quarantine, validity from the granting set's clock rates, and
//! the quarantine of fast clocks. (The fault suite shows the same against real
//! servers.)

mod common;

use std::time::Duration;

use quorumlock::{Builder, Error, MemoryInstance, Quarantine, QuorumLocker, Vote};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(10);
const PROBE: Duration = Duration::from_secs(1);

fn instances(n: usize) -> Vec<MemoryInstance> {
    common::memory_instances(n)
}

fn builder(instances: &[MemoryInstance]) -> Builder {
    common::memory_builder(instances).probe_every(PROBE)
}

/// At most 300 µs short of `expected`, never over: the clock-rate bound counts
/// `TIME`'s microsecond resolution on each 40 ms interval of the first probes
/// (25 ppm, 250 µs of a 10 s TTL).
#[track_caller]
fn assert_close(got: Duration, expected: Duration) {
    assert!(got <= expected, "{got:?} > {expected:?}");
    let short = expected - got;
    assert!(
        short < Duration::from_micros(300),
        "{got:?} != {expected:?}"
    );
}

/// Lets the monitors probe a few times.
async fn probes(count: u32) {
    tokio::time::sleep(PROBE * count + Duration::from_millis(1)).await;
}

/// Two lockers; A holds `job` on instances 0 and 1 only (2 was failing), then
/// instance 0 restarts empty.
async fn restart_under_a_holder(quarantine: Duration) -> (Vec<MemoryInstance>, QuorumLocker) {
    let set = instances(3);
    let a = builder(&set).build().await.unwrap();
    let b = builder(&set)
        .restart_quarantine(quarantine)
        .build()
        .await
        .unwrap();
    probes(1).await; // both know every run_id
    set[2].set_failing(true);
    let held = a.acquire("job", TTL).await.unwrap();
    std::mem::forget(held); // A works on, holding {0, 1}
    set[2].set_failing(false);
    set[0].restart_empty();
    probes(1).await; // B's monitor sees instance 0's new run_id
    (set, b)
}

#[tokio::test(start_paused = true)]
async fn without_quarantine_a_restarted_instance_lets_a_second_owner_in() {
    let (_set, b) = restart_under_a_holder(Duration::ZERO).await;
    // Instances 0 (empty) and 2 (free) make B's quorum while A's lock is valid.
    let second = b.try_acquire("job", TTL).await;
    assert!(second.is_ok(), "{second:?}");
    std::mem::forget(second);
}

#[tokio::test(start_paused = true)]
async fn quarantine_keeps_the_restarted_instance_from_voting() {
    let (_set, b) = restart_under_a_holder(TTL).await;
    let refused = b.try_acquire("job", TTL).await.unwrap_err();
    let causes = refused.causes();
    assert!(
        matches!(
            causes[0].vote,
            Vote::Quarantined(Quarantine::Restarted { remaining }) if remaining <= TTL
        ),
        "{refused}"
    );
    assert!(refused.to_string().contains("lost its keys"), "{refused}");
    let health = b.health().await;
    assert!(health.instances()[0].quarantined_for.is_some());

    // Once every lock it could have held has expired, it votes again.
    tokio::time::sleep(TTL).await;
    let later = b.try_acquire("job", TTL).await;
    assert!(later.is_ok(), "{later:?}");
    assert_eq!(b.health().await.instances()[0].quarantined_for, None);
}

#[tokio::test(start_paused = true)]
async fn a_locker_that_never_saw_the_old_server_does_not_quarantine_it() {
    let set = instances(3);
    set[0].restart_empty();
    let locker = builder(&set).build().await.unwrap();
    let lock = locker.try_acquire("job", TTL).await.unwrap();
    lock.release().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn health_estimates_each_clock_rate() {
    let set = instances(3);
    set[1].set_clock_rate(2.0).unwrap();
    set[2].set_clock_rate(0.5).unwrap();
    let locker = builder(&set).build().await.unwrap();
    probes(3).await;
    let health = locker.health().await;
    let rates: Vec<f64> = health
        .instances()
        .iter()
        .map(|instance| instance.clock_rate.expect("estimated"))
        .collect();
    for (rate, expected) in rates.iter().zip([1.0, 2.0, 0.5]) {
        assert!((rate - expected).abs() < 1e-3, "{rates:?}");
    }
    assert!(health.to_string().contains("clock rate 2.0000"), "{health}");
}

/// Five instances, the first two with clocks at `rate`; the last two failing, so
/// that a grant comes from instances 0, 1 and 2.
async fn fast_pair(rate: f64) -> (Vec<MemoryInstance>, QuorumLocker) {
    let set = instances(5);
    set[0].set_clock_rate(rate).unwrap();
    set[1].set_clock_rate(rate).unwrap();
    let locker = builder(&set).build().await.unwrap();
    probes(3).await;
    set[3].set_failing(true);
    set[4].set_failing(true);
    (set, locker)
}

#[tokio::test(start_paused = true)]
async fn validity_ends_when_the_fast_granting_instances_drop_the_key() {
    let (set, locker) = fast_pair(2.0).await;
    let drift = TTL.mul_f64(quorumlock::DEFAULT_DRIFT_FACTOR) + Duration::from_millis(2);
    let lock = locker.try_acquire("job", TTL).await.unwrap();
    // Granted by 0, 1 (rate 2) and 2: a rival can win once the fast two drop the
    // key, at TTL / 2 — so that is where the validity ends.
    assert_close(lock.valid_until() - lock.acquired_at(), TTL / 2 - drift);

    // And it is exactly where plain Redlock would have been wrong.
    set[3].set_failing(false);
    set[4].set_failing(false);
    let rival = builder(&set).build().await.unwrap();
    tokio::time::sleep_until(lock.valid_until()).await;
    assert!(rival.try_acquire("job", TTL).await.is_err(), "still held");
    tokio::time::sleep_until(lock.acquired_at() + TTL / 2).await;
    let stolen = rival.try_acquire("job", TTL).await;
    assert!(
        stolen.is_ok(),
        "the fast clocks let a rival in at TTL / 2: {stolen:?}"
    );
    assert!(!lock.is_valid(), "and by then our lock had already said so");
    std::mem::forget(stolen);
}

#[tokio::test(start_paused = true)]
async fn exact_clocks_keep_the_plain_validity() {
    let (_set, locker) = fast_pair(1.0).await;
    let drift = TTL.mul_f64(quorumlock::DEFAULT_DRIFT_FACTOR) + Duration::from_millis(2);
    let lock = locker.try_acquire("job", TTL).await.unwrap();
    assert_close(lock.valid_until() - lock.acquired_at(), TTL - drift);
}

#[tokio::test(start_paused = true)]
async fn fast_clocks_can_be_refused_outright() {
    let set = instances(5);
    for instance in &set[..3] {
        instance.set_clock_rate(2.0).unwrap();
    }
    let locker = builder(&set)
        .quarantine_fast_clocks(true)
        .build()
        .await
        .unwrap();
    probes(3).await;
    let started = Instant::now();
    match locker.try_acquire("job", TTL).await {
        Err(err @ Error::NotAcquired { .. }) => {
            let drifting = err
                .causes()
                .iter()
                .filter(|cause| {
                    matches!(cause.vote, Vote::Quarantined(Quarantine::ClockDrift { rate }) if (rate - 2.0).abs() < 1e-3)
                })
                .count();
            assert_eq!(drifting, 3, "{err}");
            assert!(err.to_string().contains("times as fast"), "{err}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(started.elapsed(), Duration::ZERO, "decided without asking");
    assert!(set.iter().all(|instance| instance.keys().is_empty()));

    // A minority of fast clocks leaves a quorum of trustworthy ones.
    set[0].set_clock_rate(1.0).unwrap();
    tokio::time::sleep(PROBE * 9).await; // the old samples age out
    let lock = locker.try_acquire("job", TTL).await.unwrap();
    lock.release().await.unwrap();
}

/// A locker kept past the runtime that built it (a static shared by tests with
/// a runtime each) must not leave a once-failed instance unverified forever.
#[test]
fn the_monitor_restarts_on_a_later_runtime() {
    let instance = MemoryInstance::new("m");
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let locker = first.block_on(async {
        let locker = builder(std::slice::from_ref(&instance))
            .build()
            .await
            .unwrap();
        // Let the monitor learn the run_id, then make a vote fail.
        tokio::time::sleep(Duration::from_millis(50)).await;
        instance.set_failing(true);
        assert!(locker.try_acquire("job", TTL).await.is_err());
        locker
    });
    drop(first); // the monitor's runtime is gone
    instance.set_failing(false);
    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    second.block_on(async {
        let lock = locker
            .lock("job")
            .ttl(TTL)
            .wait(Duration::from_secs(2))
            .acquire()
            .await
            .expect("verified again by a monitor on this runtime");
        lock.release().await.unwrap();
    });
}

/// A locker over one instance has no other to read after that instance lost
/// its keys: once the quarantine has passed, it votes again (it used to wait
/// for a read of another instance forever).
#[tokio::test(start_paused = true)]
async fn a_lone_restarted_instance_votes_again_after_its_quarantine() {
    let set = instances(1);
    let locker = builder(&set)
        .restart_quarantine(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    locker
        .try_acquire("job", Duration::from_millis(50))
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    set[0].restart_empty();
    locker.health().await; // the restart is seen now
                           // Short TTLs throughout: a longer one would lengthen the quarantine.
    let short = Duration::from_millis(50);
    let refused = locker.try_acquire("job", short).await;
    assert!(
        refused.is_err(),
        "voted at once after a restart: {refused:?}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    probes(2).await;
    let later = locker.try_acquire("job", short).await;
    assert!(later.is_ok(), "{later:?}");
}

/// Two of five instances lose their keys right after A took a long lock on 0,
/// 1 and 2, and 2 stops answering B: B must not count its reads of the other
/// lost one towards knowing how long A's lock lasts (the lost one forgot it
/// too), or its short quarantine lets 0 and 1 vote for a second owner.
#[tokio::test(start_paused = true)]
async fn a_read_of_another_lost_instance_does_not_end_a_quarantine() {
    let set = instances(5);
    let a = builder(&set).build().await.unwrap();
    let b = builder(&set).restart_quarantine(TTL).build().await.unwrap();
    probes(1).await; // both know every run_id
    let long = TTL * 6;
    set[3].set_failing(true);
    set[4].set_failing(true);
    let held = a.acquire("job", long).await.unwrap();
    set[3].set_failing(false);
    set[4].set_failing(false);
    // Before B's monitor reads the longer TTL A's grants left on 0, 1 and 2.
    set[0].restart_empty();
    set[1].restart_empty();
    set[2].set_failing(true);
    tokio::time::sleep(TTL + PROBE * 2).await;
    assert!(held.is_valid());
    let second = b.try_acquire("job", TTL).await;
    assert!(
        second.is_err(),
        "a second owner while A's lock is valid: {second:?}"
    );
    std::mem::forget(second);

    // Once 2 answers again, B reads A's TTL there: 0 and 1 vote again when
    // every lock they could have held has expired.
    set[2].set_failing(false);
    probes(2).await;
    let refused = b.try_acquire("job", TTL).await;
    assert!(refused.is_err(), "{refused:?}");
    tokio::time::sleep_until(held.acquired_at() + long + PROBE * 2).await;
    let later = b.try_acquire("job", TTL).await;
    assert!(later.is_ok(), "{later:?}");
    std::mem::forget(held);
}
