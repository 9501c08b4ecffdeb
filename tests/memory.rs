//! The in-memory instance: Redis semantics on the instance's own clock, and the
//! quorum logic driven through failing, paused, slow, restarted and drifting
//! instances. Time is Tokio's paused clock throughout: every run is the same.

mod common;

use std::time::Duration;

use quorumlock::{
    Error, LockValue, MemoryInstance, QuorumLocker, Shortfall, Vote, DEFAULT_INSTANCE_TIMEOUT,
};
use tokio::time::{advance, Instant};

const KEY: &str = "job";
const TTL: Duration = Duration::from_secs(10);

/// `n` healthy instances named `m0`, `m1`, ….
fn instances(n: usize) -> Vec<MemoryInstance> {
    common::memory_instances(n)
}

/// A locker that has measured every instance (`prepare`), so that the tests'
/// timings start at the first attempt.
async fn locker(instances: &[MemoryInstance]) -> QuorumLocker {
    let locker = common::memory_builder(instances)
        .build()
        .await
        .expect("build locker");
    locker.prepare().await.expect("prepare");
    locker
}

/// The instances on which `KEY` holds `value`.
fn holders(instances: &[MemoryInstance], token: &str) -> Vec<usize> {
    (0..instances.len())
        .filter(|&i| token_on(&instances[i]).as_deref() == Some(token))
        .collect()
}

/// The token and metadata in `KEY`'s value on `instance`, if any.
fn owner_on(instance: &MemoryInstance) -> Option<(String, Option<String>)> {
    let value = instance.get(KEY)?;
    let value = LockValue::parse(&value)?;
    Some((value.token.into(), value.metadata.map(Into::into)))
}

/// The token in `KEY`'s value on `instance`, if any.
fn token_on(instance: &MemoryInstance) -> Option<String> {
    let value = instance.get(KEY)?;
    LockValue::parse(&value).map(|value| value.token.to_string())
}

/// The instances on which `KEY` holds anything.
fn holding(instances: &[MemoryInstance]) -> Vec<usize> {
    (0..instances.len())
        .filter(|&i| instances[i].get(KEY).is_some())
        .collect()
}

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

// --- Semantics of one instance ---------------------------------------------

#[tokio::test(start_paused = true)]
async fn set_nx_px_and_release_through_a_one_instance_locker() {
    let instance = MemoryInstance::new("m");
    let locker = locker(std::slice::from_ref(&instance)).await;

    let lock = locker.try_acquire(KEY, ms(2000)).await.unwrap();
    assert_eq!(token_on(&instance).as_deref(), Some(lock.token()));
    assert_eq!(instance.pttl(KEY), Some(ms(2000)));
    assert_eq!(instance.keys(), [KEY]);
    assert_eq!(instance.commands(), 1, "one round per attempt");

    // NX: a second owner is refused and changes nothing.
    let err = locker.try_acquire(KEY, ms(5000)).await.unwrap_err();
    assert!(matches!(err, Error::NotAcquired { .. }), "{err}");
    assert_eq!(err.unreachable_instances(), 0);
    assert_eq!(token_on(&instance).as_deref(), Some(lock.token()));
    advance(ms(500)).await;
    assert_eq!(instance.pttl(KEY), Some(ms(1500)));

    assert_eq!(lock.release().await.unwrap(), 1);
    assert_eq!(instance.get(KEY), None);
    assert_eq!(instance.pttl(KEY), None);
    assert_eq!(instance.commands(), 3);

    // Compare-and-delete: a release never deletes another owner's value.
    let lock = locker.try_acquire(KEY, ms(2000)).await.unwrap();
    instance.set(KEY, "other-owner", Some(ms(5000)));
    assert!(matches!(lock.release().await, Err(Error::NotHeld { .. })));
    assert_eq!(instance.get(KEY).as_deref(), Some("other-owner"));
    assert_eq!(instance.pttl(KEY), Some(ms(5000)));
    locker.settle().await;
}

#[tokio::test(start_paused = true)]
async fn inspection_and_tampering() {
    let instance = MemoryInstance::new("m");
    instance.set("c", "3", None);
    instance.set("a", "1", Some(ms(100)));
    instance.set("b", "2", Some(ms(300)));
    assert_eq!(instance.keys(), ["a", "b", "c"]);
    assert_eq!(instance.pttl("c"), None, "no TTL");
    assert_eq!(instance.get("c").as_deref(), Some("3"));

    advance(ms(100)).await;
    assert_eq!(instance.keys(), ["b", "c"]);
    assert_eq!(instance.get("a"), None);
    assert_eq!(instance.pttl("b"), Some(ms(200)));

    // Planting replaces the value and the TTL.
    instance.set("b", "two", None);
    assert_eq!(instance.pttl("b"), None);
    assert_eq!(instance.get("b").as_deref(), Some("two"));

    assert!(instance.remove("b"));
    assert!(!instance.remove("b"));
    assert!(
        !instance.remove("a"),
        "an expired key is not there to remove"
    );
    assert_eq!(instance.keys(), ["c"]);
    assert_eq!(instance.commands(), 0, "inspection is not a command");

    let shown = format!("{instance:?}");
    for part in [
        "\"m\"",
        "keys: 1",
        "clock_rate: 1.0",
        "paused: false",
        "failing: false",
    ] {
        assert!(shown.contains(part), "{shown}");
    }
    let clone = instance.clone();
    clone.pause();
    clone.set_failing(true);
    assert!(
        instance.is_paused() && instance.is_failing(),
        "clones share one instance"
    );
    assert!(format!("{instance:?}").contains("paused: true"));
}

/// A key lives for its TTL on the instance's clock: at rate r it is gone after
/// ttl / r of Tokio time, and present a millisecond before.
#[tokio::test(start_paused = true)]
async fn expiry_follows_the_instance_clock() {
    for (rate, lifetime) in [(1.0, ms(2000)), (2.0, ms(1000)), (0.5, ms(4000))] {
        let instance = MemoryInstance::new("m");
        instance.set_clock_rate(rate).unwrap();
        assert_eq!(instance.clock_rate(), rate);
        let locker = locker(std::slice::from_ref(&instance)).await;
        let lock = locker.try_acquire(KEY, ms(2000)).await.unwrap();

        advance(lifetime / 2).await;
        assert_eq!(instance.pttl(KEY), Some(ms(1000)), "rate {rate}");
        advance(lifetime / 2 - ms(1)).await;
        assert_eq!(
            token_on(&instance).as_deref(),
            Some(lock.token()),
            "rate {rate}"
        );
        advance(ms(1)).await;
        assert_eq!(instance.get(KEY), None, "rate {rate}");
        assert!(instance.keys().is_empty(), "rate {rate}");

        // Expired means free for the next owner.
        let next = locker.try_acquire(KEY, ms(2000)).await.unwrap();
        assert_eq!(token_on(&instance).as_deref(), Some(next.token()));
        next.release().await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_new_clock_rate_continues_from_the_current_time() {
    let instance = MemoryInstance::new("m");
    let start = instance.now();
    let system = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    assert!(
        system.abs_diff(start) < Duration::from_secs(60),
        "starts at the system time"
    );

    advance(ms(1000)).await;
    assert_eq!(instance.now() - start, ms(1000));
    instance.set_clock_rate(2.0).unwrap();
    assert_eq!(instance.now() - start, ms(1000), "no jump");
    advance(ms(1000)).await;
    assert_eq!(instance.now() - start, ms(3000));
    instance.set_clock_rate(0.5).unwrap();
    advance(ms(1000)).await;
    assert_eq!(instance.now() - start, ms(3500));
}

#[tokio::test]
async fn an_invalid_clock_rate_is_refused() {
    let instance = MemoryInstance::new("m");
    for rate in [0.0, -0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        match instance.set_clock_rate(rate) {
            Err(Error::InvalidConfig { setting, reason }) => {
                assert_eq!(setting, "clock_rate");
                assert!(!reason.is_empty());
            }
            other => panic!("rate {rate}: {other:?}"),
        }
    }
    assert_eq!(instance.clock_rate(), 1.0, "a refused rate changes nothing");
}

/// A failing instance answers an I/O error after the full round trip, and
/// applies nothing.
#[tokio::test(start_paused = true)]
async fn a_failing_instance_answers_an_io_error_after_its_latency() {
    let instance = MemoryInstance::new("m");
    instance.set_failing(true);
    instance.set_latency(ms(100));
    let locker = QuorumLocker::builder()
        .memory(&instance)
        .instance_timeout(Duration::from_secs(1))
        .build()
        .await
        .unwrap();

    let start = Instant::now();
    let err = locker.try_acquire(KEY, TTL).await.unwrap_err();
    assert_eq!(start.elapsed(), ms(100));
    assert_eq!(err.unreachable_instances(), 1);
    match &err.causes()[0].vote {
        Vote::Failed(cause) => {
            assert_eq!(cause.kind(), redis::ErrorKind::Io);
            assert!(cause.to_string().contains("m is failing"), "{cause}");
        }
        other => panic!("{other:?}"),
    }
    locker.settle().await;
    assert!(instance.keys().is_empty());

    instance.set_failing(false);
    // It votes again once a probe has identified it and measured its clock.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lock = locker.try_acquire(KEY, TTL).await.unwrap();
    assert_eq!(token_on(&instance).as_deref(), Some(lock.token()));
    lock.release().await.unwrap();
}

// --- The quorum at N = 5 --------------------------------------------------

#[tokio::test(start_paused = true)]
async fn two_failing_of_five_still_win() {
    let instances = instances(5);
    let locker = locker(&instances).await;
    instances[3].set_failing(true);
    instances[4].set_failing(true);

    let lock = locker.acquire(KEY, TTL).await.unwrap();
    locker.settle().await;
    assert_eq!(holders(&instances, lock.token()), [0, 1, 2]);
    for instance in &instances {
        assert_eq!(instance.commands(), 1, "{}: one round", instance.name());
    }

    assert_eq!(lock.release().await.unwrap(), 3);
    locker.settle().await;
    assert!(holding(&instances).is_empty());
}

#[tokio::test(start_paused = true)]
async fn three_failing_of_five_lose_and_leave_nothing() {
    let instances = instances(5);
    let locker = locker(&instances).await;
    for instance in &instances[2..] {
        instance.set_failing(true);
    }

    let err = locker.try_acquire(KEY, TTL).await.unwrap_err();
    let Error::NotAcquired { shortfall, .. } = &err else {
        panic!("{err}");
    };
    assert!(matches!(
        shortfall,
        Shortfall::TooFewVotes { needed: 3, .. }
    ));
    assert_eq!(err.unreachable_instances(), 3);
    locker.settle().await;
    assert!(
        holding(&instances).is_empty(),
        "the healthy two were rolled back"
    );
}

/// A paused minority holds up nothing: the attempt is won at the third grant. The
/// won attempt's sets still waiting in the paused instances land on resume.
#[tokio::test(start_paused = true)]
async fn two_paused_of_five_do_not_hold_up_a_win() {
    let instances = instances(5);
    let locker = locker(&instances).await;
    instances[3].pause();
    instances[4].pause();

    let start = Instant::now();
    let lock = locker.try_acquire(KEY, TTL).await.unwrap();
    assert!(
        start.elapsed() < DEFAULT_INSTANCE_TIMEOUT,
        "{:?}",
        start.elapsed()
    );
    assert_eq!(holders(&instances, lock.token()), [0, 1, 2]);

    instances[3].resume();
    instances[4].resume();
    locker.settle().await;
    assert_eq!(holders(&instances, lock.token()), [0, 1, 2, 3, 4]);

    lock.release().await.unwrap();
    locker.settle().await;
    assert!(holding(&instances).is_empty());
}

/// Keys expire by the instance clock while the instance is stopped, as a stopped
/// server expires them the moment it runs again.
#[tokio::test(start_paused = true)]
async fn a_paused_instance_still_expires_keys() {
    let instance = MemoryInstance::new("m");
    let locker = locker(std::slice::from_ref(&instance)).await;
    let _lock = locker.try_acquire(KEY, ms(1000)).await.unwrap();
    instance.pause();
    advance(ms(1000)).await;
    instance.resume();
    assert_eq!(instance.get(KEY), None);
    let next = locker.try_acquire(KEY, ms(1000)).await.unwrap();
    next.release().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_slow_instance_counts_as_timed_out() {
    let instances = instances(3);
    let locker = locker(&instances).await;
    instances[2].set_latency(DEFAULT_INSTANCE_TIMEOUT * 4);

    let start = Instant::now();
    let lock = locker.try_acquire(KEY, TTL).await.unwrap();
    assert!(start.elapsed() < DEFAULT_INSTANCE_TIMEOUT);
    // The won attempt's late set lands after the decision.
    locker.settle().await;
    assert_eq!(holders(&instances, lock.token()), [0, 1, 2]);

    // Two releases answer at once; the slow one finishes in the background.
    assert_eq!(lock.release().await.unwrap(), 2);
    locker.settle().await;
    assert!(holding(&instances).is_empty());
}

/// A lost attempt removes its token from a slow instance once the late set has
/// landed there: the delete follows the set.
#[tokio::test(start_paused = true)]
async fn a_lost_attempt_rolls_back_a_slow_instance_after_its_late_set() {
    let instances = instances(3);
    let locker = locker(&instances).await;
    let round_trip = ms(200);
    instances[1].set_latency(round_trip);
    instances[2].set_latency(round_trip);

    let start = Instant::now();
    let err = locker.try_acquire(KEY, TTL).await.unwrap_err();
    assert_eq!(start.elapsed(), DEFAULT_INSTANCE_TIMEOUT);
    assert_eq!(err.unreachable_instances(), 2);
    let votes: Vec<&Vote> = err.causes().iter().map(|cause| &cause.vote).collect();
    assert!(matches!(votes[0], Vote::Granted), "{votes:?}");
    assert!(matches!(votes[1], Vote::TimedOut(_)), "{votes:?}");
    assert!(matches!(votes[2], Vote::TimedOut(_)), "{votes:?}");

    // The sets land half a round trip after they left; the deletes a round trip
    // after that.
    tokio::time::sleep_until(start + round_trip / 2 + ms(1)).await;
    assert_eq!(holding(&instances), [1, 2]);
    locker.settle().await;
    assert!(holding(&instances).is_empty());
    assert_eq!(start.elapsed(), round_trip * 2);
    assert_eq!(instances[1].commands(), 2, "one set, one delete");
}

// --- Contention and restarts ----------------------------------------------

#[tokio::test(start_paused = true)]
async fn two_lockers_contend_over_the_same_instances() {
    let instances = instances(3);
    let first = locker(&instances).await;
    let second = locker(&instances).await;

    let held = first.acquire(KEY, TTL).await.unwrap();
    let err = second.try_acquire(KEY, TTL).await.unwrap_err();
    let Error::NotAcquired { shortfall, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(
        *shortfall,
        Shortfall::TooFewVotes {
            granted: 0,
            needed: 2
        }
    );
    assert_eq!(err.unreachable_instances(), 0, "contention, not an outage");
    second.settle().await;
    assert_eq!(holders(&instances, held.token()), [0, 1, 2]);

    held.release().await.unwrap();
    let next = second.try_acquire(KEY, TTL).await.unwrap();
    assert_eq!(holders(&instances, next.token()), [0, 1, 2]);
    next.release().await.unwrap();
}

/// Why plain Redlock asks for persistence: two instances restarted empty let a
/// second owner win while the first lock is still valid. A restart that breaks
/// no request (`restart_empty` is silent, as a connection that reconnects by
/// itself is) is still caught, by the epoch check in the grant itself; only
/// with the check off does the second owner get in.
#[tokio::test(start_paused = true)]
async fn restarts_without_persistence_let_a_second_owner_in_only_without_the_check() {
    for check in [true, false] {
        let instances = instances(3);
        let first = locker(&instances).await;
        let builder = common::memory_builder(&instances);
        let builder = if check {
            builder
        } else {
            builder.restart_quarantine(Duration::ZERO)
        };
        let second = builder.build().await.unwrap();
        second.prepare().await.unwrap();

        let held = first.acquire(KEY, TTL).await.unwrap();
        instances[0].restart_empty();
        assert_eq!(holders(&instances, held.token()), [1, 2]);
        assert!(
            second.try_acquire(KEY, TTL).await.is_err(),
            "one restart is survived"
        );
        second.settle().await;

        instances[1].restart_empty();
        let stolen = second.try_acquire(KEY, TTL).await;
        assert!(held.is_valid());
        if check {
            let err = stolen.expect_err("both restarts caught");
            assert!(
                err.to_string().contains("data set or server changed"),
                "{err}"
            );
            assert_eq!(holders(&instances, held.token()), [2]);
            second.settle().await;
            assert_eq!(holding(&instances), [2], "nothing set on the restarted two");
        } else {
            let stolen = stolen.expect("no check: a second owner");
            assert_eq!(holders(&instances, stolen.token()), [0, 1]);
            assert_eq!(holders(&instances, held.token()), [2]);
        }
    }
}

// --- Retake, extend and probe through the lock lifecycle API ---------------

#[tokio::test(start_paused = true)]
async fn restart_empty_changes_the_run_id_in_health() {
    let instances = instances(3);
    let locker = locker(&instances).await;
    let run_ids = |health: &quorumlock::Health| -> Vec<String> {
        health
            .instances()
            .iter()
            .map(|instance| instance.run_id.clone().expect("answered"))
            .collect()
    };
    let before = run_ids(&locker.health().await);
    assert!(before.iter().all(|id| id.len() == 40));
    assert_eq!(
        run_ids(&locker.health().await),
        before,
        "stable while running"
    );

    instances[1].restart_empty();
    let after = run_ids(&locker.health().await);
    assert_eq!(after[0], before[0]);
    assert_ne!(after[1], before[1]);
    assert_eq!(after[2], before[2]);
}

#[tokio::test(start_paused = true)]
async fn extend_renews_only_a_key_still_held() {
    let instance = MemoryInstance::new("m");
    let locker = locker(std::slice::from_ref(&instance)).await;
    let lock = locker.try_acquire(KEY, ms(2000)).await.unwrap();

    advance(ms(1500)).await;
    lock.extend(ms(5000)).await.unwrap();
    assert_eq!(instance.pttl(KEY), Some(ms(5000)));

    // Deleted behind the owner's back: extend fails and creates nothing.
    assert!(instance.remove(KEY));
    assert!(lock.extend(ms(5000)).await.is_err());
    assert_eq!(instance.get(KEY), None);
    locker.settle().await;
}

#[tokio::test(start_paused = true)]
async fn a_chosen_token_retakes_its_own_lock() {
    let instance = MemoryInstance::new("m");
    let locker = locker(std::slice::from_ref(&instance)).await;
    let request = |metadata: &str| {
        locker
            .lock(KEY)
            .token("host-1")
            .metadata(metadata)
            .ttl(ms(2000))
    };
    let first = request("before-restart").try_acquire().await.unwrap();
    assert_eq!(
        owner_on(&instance),
        Some(("host-1".into(), Some("before-restart".into())))
    );
    advance(ms(1500)).await;

    // As after a restart of the holder: the same token takes the key back, with
    // its new metadata and a fresh TTL.
    let second = request("after-restart").try_acquire().await.unwrap();
    assert_eq!(
        owner_on(&instance),
        Some(("host-1".into(), Some("after-restart".into())))
    );
    assert_eq!(instance.pttl(KEY), Some(ms(2000)));

    // Another token is refused.
    let other = locker.lock(KEY).token("host-2").ttl(ms(2000));
    assert!(other.try_acquire().await.is_err());
    assert_eq!(
        owner_on(&instance),
        Some(("host-1".into(), Some("after-restart".into())))
    );

    second.release().await.unwrap();
    drop(first);
    locker.settle().await;
    assert!(instance.keys().is_empty());
}
