//! One test per safety hole of issue 15, each at the library's defaults: fresh
//! lockers built with nothing but their instances, no `probe_every`, retry or
//! quarantine tuning, and where a test calls `prepare()` or `health()` it says
//! why. Real `redis-server`s where the hole is about real servers (clocks
//! through the clock shim, restarts, a second address, a network path through a
//! `FaultProxy`); in-memory instances under Tokio's paused clock where the hole
//! is one of ordering and a deterministic schedule shows it best.
//!
//! The safety tests check for two owners at once in one of two sound ways:
//!
//! - on real servers, [`watch_exclusive`]: the test reads the key on every
//!   server directly and then asks the lock whether it is still valid; valid
//!   after a read that found fewer than a quorum of servers holding it means a
//!   rival's `SET NX` would have won on a quorum while the lock was valid;
//! - a second `try_acquire` (of the same or another locker) that succeeds at an
//!   instant at which the first lock still `is_valid()`, directly (holes 3, 4,
//!   7, 9) or through [`rival_gets_in_only_after`] (5, 6, 13).
//!
//! Holes 8, 11 and 13 also assert what their fix promises besides: a lost
//! lock's deadline, a bounded backlog, the full validity.
//!
//! `hole_04b_…` is the case the first fix of hole 4 left open (an adversary's
//! find): every failure now moves the moment a clearing probe must follow.
//!
//! Hole 12 is the qlock CLI's and is tested in `tests/cli.rs`.

mod common;

use std::time::Duration;

use futures_util::future::join_all;
use quorumlock::testing::{Direction, FaultProxy, RedisCluster, RedisServer};
use quorumlock::{Error, Lock, LockValue, MemoryInstance, QuorumLocker, DEFAULT_DRIFT_FACTOR};
use redis::aio::{ConnectionManager, MultiplexedConnection};
use tokio::time::Instant;

const KEY: &str = "job";

/// The drift allowance the defaults set aside for `ttl`.
fn drift(ttl: Duration) -> Duration {
    ttl.mul_f64(DEFAULT_DRIFT_FACTOR) + Duration::from_millis(2)
}

// ---------------------------------------------------------------------------
// Checks on real servers
// ---------------------------------------------------------------------------

/// A direct connection to every server of `cluster`: the test's own view, not
/// the locker's.
async fn direct(cluster: &RedisCluster) -> Vec<MultiplexedConnection> {
    let mut connections = Vec::new();
    for i in 0..cluster.len() {
        connections.push(cluster.connection(i).await.expect("connect"));
    }
    connections
}

/// How many of the servers behind `connections` hold `key` with `token`. A
/// server that does not answer counts as not holding it.
async fn holding(connections: &mut [MultiplexedConnection], key: &str, token: &str) -> usize {
    let mut holding = 0;
    for connection in connections.iter_mut() {
        let value: Option<String> = redis::cmd("GET")
            .arg(key)
            .query_async(connection)
            .await
            .unwrap_or(None);
        if value
            .as_deref()
            .and_then(LockValue::parse)
            .is_some_and(|value| value.token == token)
        {
            holding += 1;
        }
    }
    holding
}

/// Watches `lock` until its validity ends (bounded by its TTL and a margin):
/// fails if, at a moment the lock was still valid, fewer than `quorum` servers
/// held its key, so that a rival's `SET NX` would have won on a quorum.
///
/// Sound under any load: the lock is asked whether it is valid *after* the
/// servers were read; valid then means valid when they were read, as validity
/// only ends.
async fn watch_exclusive(cluster: &RedisCluster, lock: &Lock, quorum: usize, hole: &str) {
    let mut connections = direct(cluster).await;
    let start = Instant::now();
    let give_up = start + lock.ttl() + Duration::from_secs(5);
    let mut reads = 0u32;
    while lock.is_valid() && Instant::now() < give_up {
        let held = holding(&mut connections, lock.key(), lock.token()).await;
        if held < quorum && lock.is_valid() {
            panic!(
                "{hole}: {:?} into the lock only {held} of {} servers hold {:?}, so a rival gets \
                 a quorum, yet the lock is valid for another {:?} ({reads} reads before)",
                start.elapsed(),
                cluster.len(),
                lock.key(),
                lock.remaining(),
            );
        }
        reads += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!lock.is_valid(), "{hole}: still valid past its TTL");
}

/// How many `TIME` commands the server behind `connection` has run: only the
/// lockers' probes send it.
async fn time_calls(connection: &mut MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(connection)
        .await
        .expect("INFO commandstats");
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_time:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(0)
}

/// Returns just after a locker's probe has reached every server of `cluster`
/// (the only locker on them): its next one comes a probe interval later (1 s
/// by default).
async fn just_after_a_probe(cluster: &RedisCluster) {
    let mut connections = direct(cluster).await;
    let mut before = Vec::new();
    for connection in &mut connections {
        before.push(time_calls(connection).await);
    }
    for _ in 0..1000 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut all = true;
        for (connection, before) in connections.iter_mut().zip(&before) {
            all &= time_calls(connection).await > *before;
        }
        if all {
            return;
        }
    }
    panic!("no probe reached every server within 5 s");
}

// ---------------------------------------------------------------------------
// Checks on in-memory instances
// ---------------------------------------------------------------------------

/// Lets `rival` try for the key every 10 ms (Tokio's paused clock) for up to
/// `within`, and checks at the instant it first wins that `held` is no longer
/// valid: both valid at once is two owners. The rival must get in (the keys do
/// expire), or the test would show nothing.
async fn rival_gets_in_only_after(held: &Lock, rival: &QuorumLocker, within: Duration, hole: &str) {
    let start = Instant::now();
    while start.elapsed() <= within {
        if let Ok(theirs) = rival.try_acquire(held.key(), Duration::from_secs(10)).await {
            assert!(
                !held.is_valid(),
                "{hole}: a rival took {:?} {:?} in, while the first lock is still valid for {:?}",
                held.key(),
                start.elapsed(),
                held.remaining(),
            );
            theirs.leave_to_expire();
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{hole}: the rival never got in within {within:?}: the test shows nothing");
}

/// A fresh locker over `instances`, with the defaults.
async fn memory_locker(instances: &[MemoryInstance]) -> QuorumLocker {
    common::memory_builder(instances).build().await.unwrap()
}

// ---------------------------------------------------------------------------
// The holes
// ---------------------------------------------------------------------------

/// Hole 1, the start-up window: a fresh locker used at once, with 3 of 5 server
/// clocks at 2.0, handed out the plain formula's validity (TTL − drift) before
/// it had measured the rates, while the fast servers drop the key after TTL / 2.
/// Each of several fresh lockers, each acquiring at once, must end its validity
/// before a quorum of servers has let its key go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hole_01_a_fresh_locker_used_at_once_never_outlives_fast_clocks() {
    let fast = RedisServer::builder().clock_rate(2.0);
    let exact = RedisServer::builder();
    let cluster =
        RedisCluster::start_each(&[fast.clone(), fast.clone(), fast, exact.clone(), exact])
            .expect("start redis-server processes");
    let ttl = Duration::from_secs(2);
    let urls = cluster.urls();
    // Several start-ups at once, each its own locker and key.
    let trials = (0..3).map(|trial| {
        let urls = urls.clone();
        let cluster = &cluster;
        async move {
            let locker = QuorumLocker::builder().urls(urls).build().await.unwrap();
            let lock = locker
                .acquire(&format!("start-up-{trial}"), ttl)
                .await
                .expect("a fresh locker gets the lock");
            watch_exclusive(cluster, &lock, locker.quorum(), "hole 1 (start-up window)").await;
        }
    });
    join_all(trials).await;
}

/// Hole 2, a clock stepped back: an NTP step back on a fast server made the
/// estimator drop its samples, the rate became unknown, and the plain formula
/// applied. With 3 of 5 clocks at 2.0 and one of them stepped back 5 s, the
/// next lock must still end its validity before the fast servers drop its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hole_02_a_clock_stepped_back_is_measured_again_before_it_counts() {
    let fast = RedisServer::builder().clock_rate(2.0);
    let exact = RedisServer::builder();
    let mut cluster =
        RedisCluster::start_each(&[fast.clone(), fast.clone(), fast, exact.clone(), exact])
            .expect("start redis-server processes");
    let locker = QuorumLocker::builder()
        .urls(cluster.urls())
        .build()
        .await
        .unwrap();
    // Every clock measured before the step: the hole is in what follows it.
    locker.prepare().await.unwrap();

    cluster.set_clock_offset_ms(0, -5_000).unwrap();
    // The locker sees the step at its next probe. `health()` runs that very
    // probe (the monitor's `probe_once`) now, so that the attempt below comes
    // right after it, before the monitor's next probes could measure the clock
    // again (at least two more, 40 ms apart).
    locker.health().await;
    let ttl = Duration::from_secs(2);
    match locker.try_acquire(KEY, ttl).await {
        Ok(lock) => {
            watch_exclusive(
                &cluster,
                &lock,
                locker.quorum(),
                "hole 2 (clock stepped back)",
            )
            .await
        }
        // Refused because too few clocks are measured: safe, if not live.
        Err(Error::NotAcquired { .. }) => {}
        Err(err) => panic!("{err}"),
    }
}

/// Hole 3, a restart that breaks no request: a server restarted empty behind a
/// connection that reconnects by itself (a user's `ConnectionManager` on RESP3
/// reconnects on the disconnect push, before any request fails) voted for a
/// lock it had forgotten until the next probe. With 2 of 3 servers restarted
/// so, a second owner must not get the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hole_03_a_server_restarted_behind_a_reconnecting_connection_does_not_vote() {
    let mut cluster = common::cluster(3);
    let mut managers = Vec::new();
    for url in cluster.urls() {
        let client = redis::Client::open(format!("{url}/?protocol=resp3")).unwrap();
        managers.push(ConnectionManager::new(client).await.unwrap());
    }
    let locker = managers
        .iter()
        .enumerate()
        .fold(QuorumLocker::builder(), |builder, (i, manager)| {
            builder.connection(format!("redis-{i}"), manager.clone())
        })
        .build()
        .await
        .unwrap();
    let ttl = Duration::from_secs(10);
    let held = locker.acquire(KEY, ttl).await.unwrap();

    // Right after a probe, so that the monitor's next one (a second later)
    // comes after the attempt below: the hole is the time until then.
    just_after_a_probe(&cluster).await;
    cluster.restart_empty(1).unwrap();
    cluster.restart_empty(2).unwrap();
    // Wait until both connections are back. These pings go through clones of
    // the locker's own managers; an error one of them sees is the test's, and
    // the locker never hears of it.
    for manager in &managers[1..] {
        let mut manager = manager.clone();
        let mut back = false;
        for _ in 0..200 {
            let pong: redis::RedisResult<String> =
                redis::cmd("PING").query_async(&mut manager).await;
            if pong.is_ok() {
                back = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(back, "the connection manager never reconnected");
    }

    let second = locker.try_acquire(KEY, ttl).await;
    assert!(held.is_valid());
    match second {
        Ok(theirs) => panic!(
            "hole 3 (silent restart): a second owner {} got {KEY:?} from the restarted servers \
             while the first lock is valid for {:?}",
            theirs.token(),
            held.remaining()
        ),
        Err(err) => {
            // The grants' epoch check; or, had a probe or a failed request come
            // first after all, the restart quarantine or the suspicion.
            let text = err.to_string();
            assert!(
                [
                    "data set or server changed",
                    "lost its keys",
                    "has not been reached since"
                ]
                .iter()
                .any(|why| text.contains(why)),
                "{text}"
            );
        }
    }
}

/// Hole 4, a stale probe clears suspicion: a probe sent before a failure and
/// answered after it cleared the failure's suspicion, though it says nothing
/// about the server behind the connection since. Here instance 1 comes back
/// from the failure without the lock but with its `run_id` and epoch (as a
/// `DEBUG RELOAD` of an older snapshot would), so the grants' own identity
/// check cannot tell; only the suspicion does.
#[tokio::test(start_paused = true)]
async fn hole_04_a_probe_sent_before_a_failure_does_not_clear_its_suspicion() {
    let instances = common::memory_instances(3);
    let (m1, m2) = (&instances[1], &instances[2]);
    let holder = memory_locker(&instances).await;
    let voter = memory_locker(&instances).await;
    // Both measured before the schedule below begins (it is timed from here).
    holder.prepare().await.unwrap();
    voter.prepare().await.unwrap();
    // The holder gets the lock on instances 0 and 1 (2 was down).
    m2.set_failing(true);
    let held = holder.acquire(KEY, Duration::from_secs(10)).await.unwrap();
    m2.set_failing(false);
    // Between two of the voter's periodic probes (1 s apart, from prepare).
    tokio::time::sleep(Duration::from_millis(2_100)).await;

    // t0: a health check's probes to instance 1 take 200 ms each; the second
    // (the one recorded) leaves at t0 + 200, reads the server at t0 + 300 and
    // answers at t0 + 400.
    let t0 = Instant::now();
    m1.set_latency(Duration::from_millis(200));
    let health = tokio::spawn({
        let voter = voter.clone();
        async move { voter.health().await }
    });
    tokio::time::sleep_until(t0 + Duration::from_millis(310)).await;
    // t0 + 310: the connection to instance 1 fails (the voter sees it on an
    // unrelated lock) ...
    m1.set_latency(Duration::ZERO);
    m1.set_failing(true);
    let _unrelated = voter
        .try_acquire("unrelated", Duration::from_secs(10))
        .await;
    // ... and it comes back without the lock, same server, same epoch. Later
    // probes take 200 ms again.
    m1.set_failing(false);
    m1.remove(KEY);
    m1.set_latency(Duration::from_millis(200));
    // t0 + 400: the stale probe answers, from the server as it was at t0 + 300.
    tokio::time::sleep_until(t0 + Duration::from_millis(420)).await;
    assert!(health.is_finished());
    m1.set_latency(Duration::ZERO);

    let second = voter.try_acquire(KEY, Duration::from_secs(10)).await;
    assert!(held.is_valid());
    if let Ok(theirs) = second {
        panic!(
            "hole 4 (stale probe): a second owner {} got {KEY:?} with the failed-over instance's \
             vote, while the first lock is valid for {:?}",
            theirs.token(),
            held.remaining()
        );
    }
}

/// Hole 4 again, with the instance already suspect when the second failure
/// comes: `suspect_since` keeps the *first* failure's time, so the probe the
/// first failure triggered — sent after it, but before the second — clears
/// both. A blip fails a request (t1), the monitor probes at once (200 ms
/// round trip), the instance loses the lock while that probe is out (t1 + 150
/// ms, seen by a failing release; same `run_id` and epoch), and the probe's
/// answer (read at t1 + 100 ms, before the loss) would let it vote for a lock
/// it no longer has.
#[tokio::test(start_paused = true)]
async fn hole_04b_a_second_failure_while_suspect_is_not_cleared_by_an_earlier_probe() {
    let instances = common::memory_instances(3);
    let (m1, m2) = (&instances[1], &instances[2]);
    let holder = memory_locker(&instances).await;
    let voter = memory_locker(&instances).await;
    holder.prepare().await.unwrap();
    voter.prepare().await.unwrap();
    m2.set_failing(true);
    let held = holder.acquire(KEY, Duration::from_secs(10)).await.unwrap();
    m2.set_failing(false);
    tokio::time::sleep(Duration::from_millis(2_100)).await;

    // t1: a blip. The monitor, woken by it, probes with a 200 ms round trip.
    let t1 = Instant::now();
    m1.set_failing(true);
    let unrelated = voter
        .try_acquire("unrelated", Duration::from_secs(10))
        .await
        .unwrap();
    m1.set_failing(false);
    m1.set_latency(Duration::from_millis(200));
    // t1 + 150: the loss, seen by the release of that lock (a suspect
    // instance gets no new grants to fail, but releases still go to every
    // instance the acquire asked).
    tokio::time::sleep_until(t1 + Duration::from_millis(150)).await;
    m1.set_latency(Duration::ZERO);
    m1.set_failing(true);
    unrelated.release().await.unwrap();
    m1.set_failing(false);
    m1.remove(KEY);
    // t1 + 200: the probe's answer, read at t1 + 100, before the loss.
    tokio::time::sleep_until(t1 + Duration::from_millis(210)).await;

    let second = voter.try_acquire(KEY, Duration::from_secs(10)).await;
    assert!(held.is_valid());
    if let Ok(theirs) = second {
        panic!(
            "hole 4b (second failure while suspect): a second owner {} got {KEY:?} with the \
             failed-over instance's vote, while the first lock is valid for {:?}",
            theirs.token(),
            held.remaining()
        );
    }
}

/// Hole 5, a cancelled shorter extend: `extend(shorter)` dropped after its
/// PEXPIREs landed left the validity at the old, longer deadline while the
/// keys now expire sooner.
#[tokio::test(start_paused = true)]
async fn hole_05_a_dropped_shorter_extend_still_shortens_the_validity() {
    let instances = common::memory_instances(3);
    let locker = memory_locker(&instances).await;
    let rival = memory_locker(&instances).await;
    // The rival only probes for an overlap: measured up front, its tries start at once.
    rival.prepare().await.unwrap();
    let held = locker.acquire(KEY, Duration::from_secs(10)).await.unwrap();

    for instance in &instances {
        instance.set_latency(Duration::from_millis(40));
    }
    let short = Duration::from_secs(1);
    // Dropped at 30 ms: after its PEXPIREs reached the instances (20 ms),
    // before their replies (40 ms).
    let dropped = tokio::time::timeout(Duration::from_millis(30), held.extend(short)).await;
    assert!(dropped.is_err(), "the extend was to be dropped");
    for instance in &instances {
        let pttl = instance.pttl(KEY).expect("the key");
        assert!(pttl <= short, "the shorter TTL landed: {pttl:?}");
        instance.set_latency(Duration::ZERO);
    }
    rival_gets_in_only_after(
        &held,
        &rival,
        Duration::from_secs(3),
        "hole 5 (dropped shorter extend)",
    )
    .await;
}

/// Hole 6, concurrent extends of different TTLs: the last to finish set the
/// validity, though the instances applied the other one last. Here
/// `extend(10 s)` reaches the instances first and answers last, while
/// `extend(1 s)`, started later on faster paths, lands after it and answers
/// first.
#[tokio::test(start_paused = true)]
async fn hole_06_concurrent_extends_leave_the_validity_of_the_last_applied() {
    let instances = common::memory_instances(3);
    let locker = memory_locker(&instances).await;
    let rival = memory_locker(&instances).await;
    // The rival only probes for an overlap: measured up front, its tries start at once.
    rival.prepare().await.unwrap();
    let held = locker.acquire(KEY, Duration::from_secs(10)).await.unwrap();

    for instance in &instances {
        // Under the default instance timeout (50 ms).
        instance.set_latency(Duration::from_millis(40));
    }
    let long = held.extend(Duration::from_secs(10));
    let short = async {
        // After the long extend reached the instances (20 ms), before it answers.
        tokio::time::sleep(Duration::from_millis(25)).await;
        for instance in &instances {
            instance.set_latency(Duration::ZERO);
        }
        held.extend(Duration::from_secs(1)).await
    };
    let (long, short) = tokio::join!(long, short);
    long.unwrap();
    short.unwrap();
    for instance in &instances {
        let pttl = instance.pttl(KEY).expect("the key");
        assert!(pttl <= Duration::from_secs(1), "applied last: {pttl:?}");
    }
    rival_gets_in_only_after(
        &held,
        &rival,
        Duration::from_secs(3),
        "hole 6 (concurrent extends)",
    )
    .await;
}

/// Hole 7, one server under two addresses: without `prepare()`, a locker given
/// one server as both `127.0.0.1:P` and `localhost:P` counted its vote twice
/// (with a caller-chosen token the second name's `RETAKE` grants too). A
/// correct locker holds the lock on 2 of the 3 servers (server 0 was down);
/// the misconfigured one, over server 0 twice and server 1, must not get it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hole_07_one_server_under_two_addresses_votes_once() {
    let mut cluster = common::cluster(3);
    let ttl = Duration::from_secs(10);
    cluster.kill(0).unwrap();
    let correct = QuorumLocker::builder()
        .urls(cluster.urls())
        .build()
        .await
        .unwrap();
    let held = correct.acquire(KEY, ttl).await.unwrap();
    cluster.restart_empty(0).unwrap();

    let (p0, p1) = (cluster.server(0).port(), cluster.server(1).port());
    let misconfigured = QuorumLocker::builder()
        .url(format!("redis://127.0.0.1:{p0}"))
        .url(format!("redis://localhost:{p0}"))
        .url(format!("redis://127.0.0.1:{p1}"))
        .build()
        .await
        .unwrap();
    let second = misconfigured
        .lock(KEY)
        .ttl(ttl)
        .token("chosen-by-the-caller")
        .try_acquire()
        .await;
    assert!(held.is_valid());
    if let Ok(theirs) = second {
        panic!(
            "hole 7 (one server, two addresses): a second owner got {KEY:?} with server 0's vote \
             counted twice, valid for {:?}, while the first lock is valid for {:?}",
            theirs.remaining(),
            held.remaining()
        );
    }
}

/// Hole 8, time promised after a loss: `valid_until()` still reported a future
/// deadline once the lock was lost (a failed extend, a release).
#[tokio::test(start_paused = true)]
async fn hole_08_a_lost_lock_promises_no_more_time() {
    let instances = common::memory_instances(3);
    let locker = memory_locker(&instances).await;
    let ttl = Duration::from_secs(10);

    let held = locker.acquire(KEY, ttl).await.unwrap();
    let status = held.status();
    // Gone from a majority behind its back: the next extend fails for certain.
    instances[0].remove(KEY);
    instances[1].remove(KEY);
    let failed = held.extend(ttl).await;
    assert!(
        matches!(failed, Err(Error::NotExtended { .. })),
        "{failed:?}"
    );
    let now = Instant::now();
    assert!(!held.is_valid());
    assert!(
        held.valid_until() <= now,
        "hole 8: lost, yet valid until {:?} from now",
        held.valid_until() - now
    );
    assert!(
        status.valid_until() <= now,
        "hole 8: the status of a lost lock is valid for {:?}",
        status.valid_until() - now
    );

    // A released lock is lost as well.
    let released = locker.acquire("released", ttl).await.unwrap();
    let status = released.status();
    released.release().await.unwrap();
    let now = Instant::now();
    assert!(!status.is_valid());
    assert!(
        status.valid_until() <= now,
        "hole 8: released, yet valid until {:?} from now",
        status.valid_until() - now
    );
}

/// Hole 9, a TTL longer than the restart quarantine: the quarantine defaults
/// to the default TTL (10 s), so after two instances restarted empty a 60 s
/// lock lost its protection once 10 s had passed, with 50 s of validity left.
#[tokio::test(start_paused = true)]
async fn hole_09_a_restarted_instance_waits_out_the_longest_ttl() {
    let instances = common::memory_instances(3);
    let locker = memory_locker(&instances).await;
    let long = Duration::from_secs(60);
    let held = locker.acquire(KEY, long).await.unwrap();
    // Silent restarts: the monitor notices them at its next probe (1 s).
    instances[1].restart_empty();
    instances[2].restart_empty();
    let restarted = Instant::now();

    let mut tries = 0;
    // From past the default quarantine to the end of the validity.
    tokio::time::sleep(Duration::from_secs(12)).await;
    while held.remaining() > Duration::from_secs(1) {
        let second = locker.try_acquire(KEY, long).await;
        assert!(held.is_valid());
        if let Ok(theirs) = second {
            panic!(
                "hole 9 (TTL over the quarantine): {:?} after the restarts a second owner {} got \
                 {KEY:?}, while the first lock is valid for {:?}",
                restarted.elapsed(),
                theirs.token(),
                held.remaining()
            );
        }
        tries += 1;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    assert!(tries >= 9, "{tries}");
}

/// Hole 10, an estimate where a bound is needed: the rate fitted through the
/// middles of the round trips over the first probes put a 1.02 clock at about
/// 1.00 when the round trips were lopsided, and a 10 s lock outlived its keys
/// (drift allowance 102 ms, keys gone 196 ms early). Here every path to the
/// servers delays requests by 5 ms during the first probe, and replies by 5 ms
/// afterwards: the first reading is late in its round trip, the later ones
/// early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hole_10_a_slightly_fast_clock_is_bounded_not_estimated() {
    let cluster = RedisCluster::start_with(3, &RedisServer::builder().clock_rate(1.02))
        .expect("start redis-server processes");
    let mut proxies = Vec::new();
    for server in cluster.servers() {
        proxies.push(FaultProxy::start(server.addr()).await.unwrap());
    }
    let lopsided = Duration::from_millis(5);
    for proxy in &proxies {
        proxy.set_latency(Direction::ToServer, lopsided);
    }
    let locker = QuorumLocker::builder()
        .urls(proxies.iter().map(FaultProxy::url))
        .build()
        .await
        .unwrap();
    let flip = async {
        // The first probe's `INFO server` reply (over a kilobyte) is through.
        for _ in 0..5000 {
            if proxies
                .iter()
                .all(|proxy| proxy.bytes_forwarded(Direction::ToClient) > 1000)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for proxy in &proxies {
            proxy.set_latency(Direction::ToServer, Duration::ZERO);
            proxy.set_latency(Direction::ToClient, lopsided);
        }
    };
    let ttl = Duration::from_secs(10);
    let ((), lock) = tokio::join!(flip, locker.acquire(KEY, ttl));
    let lock = lock.expect("a fresh locker gets the lock");
    watch_exclusive(&cluster, &lock, locker.quorum(), "hole 10 (estimated rate)").await;
}

/// Hole 11, unbounded work for a stalled instance: every cycle left a request
/// waiting on an instance stopped by `SIGSTOP`, so background work (and memory)
/// grew with the number of cycles. Counted here as the requests the stopped
/// instance finds waiting when it resumes: at most the backlog cap, however
/// many cycles ran.
#[tokio::test(start_paused = true)]
async fn hole_11_a_stalled_instance_collects_a_bounded_backlog() {
    let instances = common::memory_instances(3);
    let locker = memory_locker(&instances).await;
    // Identified and measured before it stops: only then does it vote at all.
    locker.prepare().await.unwrap();
    let stalled = &instances[0];
    stalled.pause();
    let before = stalled.commands();
    let cycles = 3_000;
    for _ in 0..cycles {
        let lock = locker.acquire(KEY, Duration::from_secs(10)).await.unwrap();
        lock.release().await.unwrap();
    }
    stalled.resume();
    let backlog = stalled.commands() - before;
    // The cap (1024 requests in flight per instance) and a little slack.
    assert!(
        backlog <= 1_100,
        "hole 11 (stalled instance): {backlog} requests waited on it after {cycles} cycles"
    );
    let settled = tokio::time::timeout(Duration::from_secs(60), locker.settle()).await;
    assert!(settled.is_ok(), "background work never finished");
}

/// Hole 13, validity halved by the first grants: with 2 of 5 clocks at 2.0
/// answering first, the quorum's first three grants included them and the lock
/// was valid for half its TTL, though the three true clocks' grants came a few
/// milliseconds later. The validity must be the full one — and still safe.
#[tokio::test(start_paused = true)]
async fn hole_13_fast_clocks_answering_first_do_not_halve_the_validity() {
    let instances = common::memory_instances(5);
    instances[0].set_clock_rate(2.0).unwrap();
    instances[1].set_clock_rate(2.0).unwrap();
    instances[2].set_latency(Duration::from_millis(4));
    instances[3].set_latency(Duration::from_millis(10));
    instances[4].set_latency(Duration::from_millis(10));
    let locker = memory_locker(&instances).await;
    let rival = memory_locker(&instances).await;
    // The rival only probes for an overlap: measured up front, its tries start at once.
    rival.prepare().await.unwrap();

    let ttl = Duration::from_secs(10);
    let lock = locker.acquire(KEY, ttl).await.unwrap();
    let validity = lock.valid_until() - lock.acquired_at();
    // Not the full TTL − drift either: three probes 40 ms apart over a 10 ms
    // round trip bound the true clocks at 1.11 (the round trip over the
    // interval), so about 8.9 s. Half the TTL (4.9 s) is the hole.
    assert!(
        validity >= ttl * 3 / 4,
        "hole 13 (halved validity): valid for {validity:?} of a {ttl:?} TTL"
    );
    assert!(validity <= ttl - drift(ttl), "{validity:?}");
    // Safe all the same: a rival gets in only once the lock has expired.
    rival_gets_in_only_after(&lock, &rival, ttl * 2, "hole 13").await;
}

/// Hole 9 across processes (an adversary's find): the quarantine covered the
/// longest TTL *this* locker had sent, not another process's. A holds a 60 s
/// lock; B, which only ever used 10 s, saw instance 0 restart and let it vote
/// again after 10 s. The servers now keep the longest TTL set on them (the
/// epoch hash's `ttl`), and B's quarantine lasts that long.
#[tokio::test(start_paused = true)]
async fn hole_09b_the_quarantine_covers_other_lockers_longer_ttls() {
    let instances = common::memory_instances(3);
    let a = memory_locker(&instances).await;
    let b = memory_locker(&instances).await;
    a.prepare().await.unwrap();
    b.prepare().await.unwrap();
    // A previous owner's leftover on instance 2: A wins on {0, 1} only.
    instances[2].set(KEY, "leftover", Some(Duration::from_millis(500)));
    let held = a.try_acquire(KEY, Duration::from_secs(60)).await.unwrap();
    // B's probes read the longest TTL from the servers.
    tokio::time::sleep(Duration::from_secs(2)).await;
    instances[0].restart_empty();
    tokio::time::sleep(Duration::from_secs(11)).await; // past B's own 10 s
    assert!(held.is_valid());
    let second = b.try_acquire(KEY, Duration::from_secs(10)).await;
    if let Ok(theirs) = second {
        panic!(
            "hole 9b (another locker's TTL): a second owner {} got {KEY:?} while the first \
             lock is valid for {:?}",
            theirs.token(),
            held.remaining()
        );
    }
    held.leave_to_expire();
}

/// Hole 9 with a stale reading (the second review's find): B read the servers'
/// longest TTL a moment before A took a 60 s lock, and instance 0 restarted
/// before B's next probe. The quarantine is no longer fixed when the loss is
/// seen: it lasts the longest TTL as read at each attempt, and ends only once
/// enough other instances were read after the loss (any lock held across it
/// was granted by some of them).
#[tokio::test(start_paused = true)]
async fn hole_09c_a_quarantine_grows_with_readings_after_the_loss() {
    let instances = common::memory_instances(3);
    let a = memory_locker(&instances).await;
    let b = memory_locker(&instances).await;
    a.prepare().await.unwrap();
    b.prepare().await.unwrap();
    instances[2].set(KEY, "leftover", Some(Duration::from_millis(1500)));
    let held = a.try_acquire(KEY, Duration::from_secs(60)).await.unwrap();
    // Before B's next probe reads the 60 s.
    instances[0].restart_empty();
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert!(held.is_valid());
    let second = b.try_acquire(KEY, Duration::from_secs(5)).await;
    if let Ok(theirs) = second {
        panic!(
            "hole 9c (stale reading): a second owner {} got {KEY:?} while the first lock is \
             valid for {:?}",
            theirs.token(),
            held.remaining()
        );
    }
    held.leave_to_expire();
}

/// A dropped locker's probe loops end at once, not after `probe_every` (the
/// second review's find: 100 lockers with `probe_every(1 h)` left 100 tasks).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn dropped_lockers_leave_no_probe_tasks() {
    let instances = common::memory_instances(3);
    let baseline = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    for _ in 0..50 {
        let locker = common::memory_builder(&instances)
            .probe_every(Duration::from_secs(3600))
            .build()
            .await
            .unwrap();
        locker
            .acquire(KEY, Duration::from_secs(1))
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
        locker.settle().await;
    }
    // Let the woken loops run to their end.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    let alive = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    assert!(
        alive <= baseline + 1,
        "{alive} tasks alive, {baseline} before"
    );
}
