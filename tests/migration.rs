//! Migrating from an old Redis to a new one in three phases — `[old]`, then
//! `[old, new]` with quorum 2, then `[new]` — seen by the mutual-exclusion
//! checker against two real servers (instance 0 is the old one, 1 the new one).
//!
//! Clients of adjacent phases run together during a rolling deploy and must
//! still exclude each other; clients of phases 1 and 3 share no instance and do
//! not, which is why phase 2 cannot be skipped.

use std::time::Duration;

use quorumlock::testing::{Checker, RedisCluster};
use quorumlock::{Error, QuorumLocker, RetryPolicy};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Long next to the work: a holder never outlives its validity, so only a
/// real exclusion failure can make two tenures overlap.
const TTL: Duration = Duration::from_secs(2);
/// Generous: this checks exclusion, not speed, on a possibly loaded machine.
const INSTANCE_TIMEOUT: Duration = Duration::from_millis(500);
/// Keys the clients contend on.
const KEYS: usize = 2;
/// Lockers per phase (each one a "process" with its own connections) and tasks
/// per locker.
const CLIENTS: usize = 2;
const TASKS: usize = 2;
/// Locks each task takes.
const ITERATIONS: usize = 25;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// `[old]`
    One = 1,
    /// `[old, new]`, quorum 2
    Two = 2,
    /// `[new]`
    Three = 3,
}

impl Phase {
    /// The builder as the playbook in docs/MIGRATION.md configures each phase.
    async fn locker(self, cluster: &RedisCluster) -> QuorumLocker {
        let urls = cluster.urls();
        let (old, new) = (&urls[0], &urls[1]);
        let builder = QuorumLocker::builder()
            .instance_timeout(INSTANCE_TIMEOUT)
            .default_wait(Duration::from_secs(3))
            // Quick retries: more hand-overs between phases per second of test.
            .retry(RetryPolicy::fixed(Duration::from_millis(4)).with_jitter(0.75));
        let builder = match self {
            Phase::One => builder.urls([old]),
            Phase::Two => builder.urls([old, new]).quorum(2),
            Phase::Three => builder.urls([new]),
        };
        builder.build().await.expect("build locker")
    }

    fn of(holder: usize) -> Self {
        match holder / 100 {
            1 => Phase::One,
            2 => Phase::Two,
            _ => Phase::Three,
        }
    }
}

/// Runs clients of phases `a` and `b` at the same time on shared keys and returns
/// every tenure they recorded. Each client records from the moment its acquire
/// returned to the moment it stopped working (or its validity ended, if sooner),
/// then releases. Checks that nothing is left in either server afterwards.
async fn contend(a: Phase, b: Phase) -> Checker {
    let cluster = RedisCluster::start(2).expect("start 2 redis-server processes");
    let checker = Checker::new();
    let mut lockers = Vec::new();
    let mut tasks = JoinSet::new();
    for phase in [a, b] {
        for client in 0..CLIENTS {
            let locker = phase.locker(&cluster).await;
            lockers.push(locker.clone());
            for task in 0..TASKS {
                let holder = phase as usize * 100 + client * 10 + task;
                let (locker, checker) = (locker.clone(), checker.clone());
                tasks.spawn(async move {
                    for i in 0..ITERATIONS {
                        let key = format!("job{}", (holder + i) % KEYS);
                        let lock = match locker.acquire(&key, TTL).await {
                            Ok(lock) => lock,
                            // Lost to contention for the whole wait: no tenure.
                            Err(Error::NotAcquired { .. }) => continue,
                            Err(other) => panic!("holder {holder}: {other}"),
                        };
                        let start = Instant::now();
                        // The work: a few milliseconds, far below the validity.
                        let work = 3 + (holder + i) % 5;
                        tokio::time::sleep(Duration::from_millis(work as u64)).await;
                        let end = Instant::now().min(lock.valid_until());
                        checker.record(&key, holder, start, end);
                        lock.release().await.expect("release");
                    }
                });
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a client task failed");
    }
    for locker in &lockers {
        locker.settle().await;
    }
    let left = cluster.keys_everywhere("*").await.expect("scan keys");
    assert!(left.is_empty(), "keys left behind: {left:?}");

    let tenures = checker.tenures();
    for phase in [a, b] {
        let held = tenures
            .iter()
            .filter(|tenure| Phase::of(tenure.holder) == phase)
            .count();
        // Otherwise the run would prove nothing about the pair.
        assert!(held > 0, "phase {phase:?} never held a lock");
    }
    checker
}

/// How often a key passed directly from a holder of one phase to a holder of
/// the other: evidence that the phases really did contend.
fn hand_overs(checker: &Checker) -> usize {
    let mut tenures = checker.tenures();
    tenures.sort_by_key(|tenure| (tenure.key.clone(), tenure.start));
    tenures
        .windows(2)
        .filter(|pair| {
            pair[0].key == pair[1].key && Phase::of(pair[0].holder) != Phase::of(pair[1].holder)
        })
        .count()
}

fn report(checker: &Checker) -> String {
    let violations = checker.violations();
    let mut text = format!(
        "{} tenures, {} hand-overs between phases, {} violations",
        checker.len(),
        hand_overs(checker),
        violations.len()
    );
    for violation in violations.iter().take(5) {
        text.push_str(&format!("\n  {violation}"));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn phases_1_and_2_exclude_each_other() {
    let checker = contend(Phase::One, Phase::Two).await;
    println!("phases 1+2: {}", report(&checker));
    assert!(checker.violations().is_empty(), "{}", report(&checker));
    assert!(hand_overs(&checker) > 0, "{}", report(&checker));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn phases_2_and_3_exclude_each_other() {
    let checker = contend(Phase::Two, Phase::Three).await;
    println!("phases 2+3: {}", report(&checker));
    assert!(checker.violations().is_empty(), "{}", report(&checker));
    assert!(hand_overs(&checker) > 0, "{}", report(&checker));
}

/// The reason for phase 2: `[old]` and `[new]` share no instance, so each
/// side wins its own quorum of one and both hold the same key at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skipping_phase_2_lets_phases_1_and_3_overlap() {
    let checker = contend(Phase::One, Phase::Three).await;
    println!("phases 1+3: {}", report(&checker));
    let crossing = checker
        .violations()
        .iter()
        .filter(|v| Phase::of(v.first.holder) != Phase::of(v.second.holder))
        .count();
    assert!(crossing > 0, "{}", report(&checker));
    // Within one phase the lock still works: every overlap crosses phases.
    assert_eq!(crossing, checker.violations().len(), "{}", report(&checker));
}

/// The price of phase 2: a lock needs both servers, so while either is down no
/// phase-2 client can take one (and the error says which one failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phase_2_needs_both_servers() {
    let mut cluster = RedisCluster::start(2).expect("start 2 redis-server processes");
    let locker = Phase::Two.locker(&cluster).await;
    locker
        .try_acquire("job", TTL)
        .await
        .expect("both up")
        .release()
        .await
        .expect("release");
    cluster.kill(1).expect("kill the new server");
    match locker.try_acquire("job", TTL).await {
        Err(err @ Error::NotAcquired { .. }) => assert_eq!(err.unreachable_instances(), 1, "{err}"),
        other => panic!("expected NotAcquired with the new server down, got {other:?}"),
    }
    locker.settle().await;
    let left = cluster.keys_everywhere("*").await.expect("scan keys");
    assert!(left.is_empty(), "keys left behind: {left:?}");
}
