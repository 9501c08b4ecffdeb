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

/// Fenced acquires, with one instance's counter set below 1 or past 2^53 (its
/// script sets the key, then fails), dropped at every await point of both
/// rounds: no lock key stays behind, on the tampered instance either, and
/// every token handed out is one the intact instances counted.
#[tokio::test]
async fn fenced_acquires_with_a_tampered_counter_dropped_at_every_await_point_leave_no_key() {
    let cluster = cluster(3);
    let locker = builder(&cluster).build().await.unwrap();
    locker.prepare().await.unwrap();
    let mut tampered = cluster.connection(0).await.unwrap();
    let (mut dropped, mut won) = (0, 0);
    for i in 0..300usize {
        let key = format!("cancel-{i}");
        let counter = if i % 2 == 0 { "-5" } else { "9007199254740991" };
        let _: () = redis::AsyncCommands::set(&mut tampered, format!("{key}:fence"), counter)
            .await
            .unwrap();
        match poll_then_drop(locker.lock(&key).ttl(TTL).fenced().acquire(), i % 16).await {
            Some(result) => {
                won += 1;
                let lock = result.unwrap();
                assert_eq!(lock.fencing_token(), Some(1), "{key}");
                lock.release().await.unwrap();
            }
            None => dropped += 1,
        }
    }
    locker.settle().await;
    assert!(dropped > 0 && won > 0, "dropped {dropped}, won {won}");
    let mut left = Vec::new();
    for i in 0..cluster.len() {
        for key in cluster.keys(i, "cancel-*").await.unwrap() {
            if !key.ends_with(":fence") {
                left.push((i, key));
            }
        }
    }
    assert!(left.is_empty(), "dropped {dropped}, won {won}: {left:?}");
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

// ---------------------------------------------------------------------------
// Drops at random *times*, as a caller's timeout or cancellation makes them.
//
// The tests above drop at a counted number of polls. These drop wherever a timer
// happens to fire: a random delay around the time one attempt takes, so some
// futures finish and the rest are dropped with their sets unsent, in flight, half
// answered, or (contended) between attempts. Keys are unique per iteration and no
// settle runs between iterations, so rollbacks overlap with later attempts, as in
// a busy caller. After one bounded settle, every instance is swept.
//
// Half the calls run under `tokio::time::timeout`. Tokio's timer fires on
// whole milliseconds, so a timeout of `d` drops at `d` plus the rest of the
// current millisecond, which is longer than an uncontended attempt on loopback:
// those mostly complete. The other half race a signal sent from another thread
// at the drawn time (`select!`, like a cancellation token), which drops within
// about 0.1 ms of it, inside the attempt.
//
// The delays come from a seeded xorshift; set QUORUMLOCK_CANCEL_SEED (decimal or
// 0x-hex) to replay the seed a failure printed.
// ---------------------------------------------------------------------------

use std::time::Instant;

use quorumlock::testing::RedisCluster;
use quorumlock::{Error, Lock, QuorumLocker, RetryPolicy};

const DEFAULT_SEED: u64 = 0x51ED_C0DE_D00D_F00D;
/// Settle must finish within this, or the test fails instead of hanging.
const SETTLE_BOUND: Duration = Duration::from_secs(10);
/// Every window starts at least this wide (0..1.5 ms), widened for slow machines.
const MIN_WINDOW: Duration = Duration::from_micros(1500);
const MAX_WINDOW: Duration = Duration::from_millis(100);
/// Iterations between adjustments of the timeout window.
const CHUNK: usize = 25;

fn seed() -> u64 {
    let text = std::env::var("QUORUMLOCK_CANCEL_SEED").unwrap_or_default();
    let text = text.trim();
    if text.is_empty() {
        return DEFAULT_SEED;
    }
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
        None => text.parse(),
    };
    parsed.unwrap_or_else(|_| panic!("QUORUMLOCK_CANCEL_SEED={text:?} is not a u64"))
}

/// An independent-looking stream of draws per test from one seed.
fn stream(seed: u64, salt: u64) -> fastrand::Rng {
    fastrand::Rng::with_seed(seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Acquire,
    TryAcquire,
}

/// What drops the future.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    /// `tokio::time::timeout(after, …)`, as most callers do. Fires on Tokio's
    /// millisecond ticks, so it drops in `(after, after + 1 ms]`.
    Timeout,
    /// `tokio::select!` against a signal another thread sends `after` from the
    /// start, as a cancellation token would: within about 0.1 ms, so
    /// drops also land inside an attempt that takes well under a millisecond.
    Signal,
}

/// One call: which future, what drops it, and when.
#[derive(Debug, Clone, Copy)]
struct Call {
    op: Op,
    trigger: Trigger,
    after: Duration,
}

impl Call {
    fn draw(rng: &mut fastrand::Rng, window: &Window) -> Self {
        let op = if rng.bool() {
            Op::Acquire
        } else {
            Op::TryAcquire
        };
        let trigger = if rng.bool() {
            Trigger::Timeout
        } else {
            Trigger::Signal
        };
        let after = Duration::from_nanos(rng.u64(0..(window.upper.as_nanos() as u64).max(1)));
        Self { op, trigger, after }
    }

    /// Runs the call on `key`: `None` when it was dropped before completing, and
    /// how long it ran.
    async fn run(
        self,
        locker: &QuorumLocker,
        key: &str,
    ) -> (Option<quorumlock::Result<Lock>>, Duration) {
        let start = Instant::now();
        let future = async {
            match self.op {
                Op::Acquire => locker.acquire(key, TTL).await,
                Op::TryAcquire => locker.try_acquire(key, TTL).await,
            }
        };
        let result = match self.trigger {
            Trigger::Timeout => tokio::time::timeout(self.after, future).await.ok(),
            Trigger::Signal => {
                let (fire, fired) = tokio::sync::oneshot::channel::<()>();
                let at = start + self.after;
                std::thread::spawn(move || {
                    std::thread::sleep(at.saturating_duration_since(Instant::now()));
                    let _ = fire.send(());
                });
                tokio::select! {
                    biased;
                    result = future => Some(result),
                    _ = fired => None,
                }
            }
        };
        (result, start.elapsed())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Ending {
    /// The trigger fired first: the future was dropped mid-flight.
    Dropped,
    /// It completed with a lock, which was then released.
    Won,
    /// It completed with `NotAcquired`.
    Refused,
}

/// What one iteration did, for the failure message.
#[derive(Debug)]
struct Entry {
    key: String,
    call: Call,
    elapsed: Duration,
    ending: Ending,
}

/// The median time of an uncontended acquire on fresh keys, each released.
async fn uncontended_latency(locker: &QuorumLocker, prefix: &str) -> Duration {
    let mut samples = Vec::new();
    for i in 0..9 {
        let start = Instant::now();
        let lock = locker
            .acquire(&format!("{prefix}{i}"), TTL)
            .await
            .expect("uncontended acquire");
        samples.push(start.elapsed());
        lock.release().await.expect("release");
    }
    settle(locker, "after measuring").await;
    samples.sort_unstable();
    samples[samples.len() / 2]
}

async fn settle(locker: &QuorumLocker, context: &str) {
    if tokio::time::timeout(SETTLE_BOUND, locker.settle())
        .await
        .is_err()
    {
        panic!("settle did not finish within {SETTLE_BOUND:?}: {context}");
    }
}

/// Delays drawn uniformly from `0..upper`. Every `CHUNK` iterations the window
/// halves if under a fifth of the chunk was dropped and doubles if under a fifth
/// completed, so both endings keep occurring in fair numbers whatever the
/// machine's speed.
struct Window {
    upper: Duration,
    chunk: (usize, usize),
    history: Vec<Duration>,
}

impl Window {
    fn new(upper: Duration) -> Self {
        let upper = upper.clamp(MIN_WINDOW, MAX_WINDOW);
        Self {
            upper,
            chunk: (0, 0),
            history: vec![upper],
        }
    }

    fn record(&mut self, ending: Ending) {
        match ending {
            Ending::Dropped => self.chunk.0 += 1,
            Ending::Won | Ending::Refused => self.chunk.1 += 1,
        }
        let (dropped, completed) = self.chunk;
        if dropped + completed < CHUNK {
            return;
        }
        let upper = if completed * 5 < CHUNK {
            (self.upper * 2).min(MAX_WINDOW)
        } else if dropped * 5 < CHUNK {
            (self.upper / 2).max(Duration::from_micros(50))
        } else {
            self.upper
        };
        if upper != self.upper {
            self.upper = upper;
            self.history.push(upper);
        }
        self.chunk = (0, 0);
    }
}

/// Counts of a run, checked for both endings and printed (`--nocapture`).
fn summarize(name: &str, seed: u64, log: &[Entry], window: &Window, started: Instant) {
    let count = |ending: Ending, timeout: Option<bool>| {
        log.iter()
            .filter(|entry| entry.ending == ending)
            .filter(|entry| {
                timeout
                    .is_none_or(|timeout| timeout == matches!(entry.call.trigger, Trigger::Timeout))
            })
            .count()
    };
    let (dropped, won, refused) = (
        count(Ending::Dropped, None),
        count(Ending::Won, None),
        count(Ending::Refused, None),
    );
    let drop_times: Vec<Duration> = log
        .iter()
        .filter(|entry| entry.ending == Ending::Dropped)
        .map(|entry| entry.elapsed)
        .collect();
    println!(
        "{name}: seed {seed:#x}, {} iterations in {:?}: dropped {dropped} \
         ({} by timeout, {} by signal; after {:?}..{:?}), won {won}, refused {refused}; \
         windows {:?}",
        log.len(),
        started.elapsed(),
        count(Ending::Dropped, Some(true)),
        count(Ending::Dropped, Some(false)),
        drop_times.iter().min().copied().unwrap_or_default(),
        drop_times.iter().max().copied().unwrap_or_default(),
        window.history,
    );
    assert!(
        dropped > 0 && won + refused > 0,
        "{name}: seed {seed:#x}: both endings must occur: dropped {dropped}, \
         won {won}, refused {refused}, windows {:?}",
        window.history
    );
}

/// `(instance, key)` pairs with the iterations that left them, the first few.
fn describe<'a>(keys: impl IntoIterator<Item = &'a (usize, String)>, log: &[Entry]) -> String {
    const SHOWN: usize = 12;
    let keys: Vec<_> = keys.into_iter().collect();
    let mut lines: Vec<String> = keys
        .iter()
        .take(SHOWN)
        .map(|(instance, key)| {
            let entry = log.iter().find(|entry| entry.key == *key);
            format!("  instance {instance}: {key} from {entry:?}")
        })
        .collect();
    if keys.len() > SHOWN {
        lines.push(format!("  … and {} more", keys.len() - SHOWN));
    }
    format!("{} key(s):\n{}", keys.len(), lines.join("\n"))
}

/// Fails with the iterations behind any key left under `prefix`.
async fn assert_swept(cluster: &RedisCluster, prefix: &str, log: &[Entry], context: &str) {
    let left = cluster
        .keys_everywhere(&format!("{prefix}*"))
        .await
        .expect("SCAN every instance");
    if !left.is_empty() {
        panic!("{context}: left behind {}", describe(&left, log));
    }
    assert_eq!(total_keys(cluster).await, 0, "{context}: stray keys");
}

/// Uncontended `acquire` / `try_acquire` under random timeouts on `n` servers.
async fn random_drops_leave_no_key(n: usize, iterations: usize) {
    let seed = seed();
    let name = format!("uncontended n = {n}");
    let mut rng = stream(seed, n as u64);
    let cluster = cluster(n);
    let locker = common::locker(&cluster).await;
    locker.prepare().await.unwrap();
    let latency = uncontended_latency(&locker, "probe-").await;
    let mut window = Window::new(latency * 2);
    let mut log = Vec::with_capacity(iterations);
    let started = Instant::now();
    for i in 0..iterations {
        let key = format!("timed-{i}");
        let call = Call::draw(&mut rng, &window);
        let (result, elapsed) = call.run(&locker, &key).await;
        let ending = match result {
            None => Ending::Dropped,
            Some(Ok(lock)) => {
                let released = lock.release().await;
                assert!(
                    matches!(released, Ok(count) if count >= 1),
                    "{name}: seed {seed:#x}: release of {key}: {released:?}"
                );
                Ending::Won
            }
            Some(Err(err)) => panic!("{name}: seed {seed:#x}: uncontended {call:?} {key}: {err}"),
        };
        window.record(ending);
        log.push(Entry {
            key,
            call,
            elapsed,
            ending,
        });
    }
    let context = format!("{name}: seed {seed:#x}, latency {latency:?}");
    settle(&locker, &context).await;
    assert_swept(&cluster, "timed-", &log, &context).await;
    summarize(&name, seed, &log, &window, started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquires_dropped_at_random_times_leave_no_key_on_3() {
    random_drops_leave_no_key(3, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquires_dropped_at_random_times_leave_no_key_on_5() {
    random_drops_leave_no_key(5, 120).await;
}

/// A holder takes each key on just enough instances to block a quorum (all of
/// them through a locker of its own over that subset); the waiter gets grants on
/// the rest, loses, rolls back and retries every ~millisecond until dropped. Its
/// grants must all be rolled back; the holder's keys must survive, intact.
async fn contended_random_drops_leave_only_the_holder(n: usize, iterations: usize) {
    let seed = seed();
    let name = format!("contended n = {n}");
    let mut rng = stream(seed, 0x100 + n as u64);
    let cluster = cluster(n);
    let quorum = n / 2 + 1;
    let blocking = n - quorum + 1;
    let holder = QuorumLocker::builder()
        .urls(cluster.urls().into_iter().take(blocking))
        .quorum(blocking)
        .instance_timeout(common::TIMEOUT)
        .build()
        .await
        .unwrap();
    holder.prepare().await.unwrap();
    let probe = common::locker(&cluster).await;
    probe.prepare().await.unwrap();
    let latency = uncontended_latency(&probe, "probe-").await;
    // Several attempts fit in the acquire timeout, and some acquires run out of it
    // (and complete with NotAcquired) inside the window.
    let default_wait = (latency * 4).max(Duration::from_millis(3));
    let waiter = common::builder(&cluster)
        .retry(RetryPolicy::fixed(Duration::from_micros(200)).with_jitter(0.5))
        .default_wait(default_wait)
        .build()
        .await
        .unwrap();
    waiter.prepare().await.unwrap();
    assert_eq!(waiter.quorum(), quorum);
    let mut window = Window::new(default_wait + latency * 2);
    let mut log = Vec::with_capacity(iterations);
    let mut held = Vec::with_capacity(iterations);
    let started = Instant::now();
    for i in 0..iterations {
        let key = format!("held-{i}");
        held.push(holder.acquire(&key, TTL).await.expect("holder acquire"));
        let call = Call::draw(&mut rng, &window);
        let (result, elapsed) = call.run(&waiter, &key).await;
        let ending = match result {
            None => Ending::Dropped,
            Some(Ok(lock)) => {
                panic!("{name}: seed {seed:#x}: {call:?} took {key} from its holder: {lock:?}")
            }
            Some(Err(Error::NotAcquired { .. })) => Ending::Refused,
            Some(Err(err)) => panic!("{name}: seed {seed:#x}: {call:?} {key}: {err}"),
        };
        window.record(ending);
        log.push(Entry {
            key,
            call,
            elapsed,
            ending,
        });
    }
    let context = format!("{name}: seed {seed:#x}, latency {latency:?}");
    settle(&waiter, &context).await;
    // Exactly the holder's keys, on exactly its instances...
    let mut expected: Vec<(usize, String)> = (0..blocking)
        .flat_map(|instance| log.iter().map(move |entry| (instance, entry.key.clone())))
        .collect();
    expected.sort_unstable();
    let found = cluster.keys_everywhere("held-*").await.expect("SCAN");
    if found != expected {
        let extra = found.iter().filter(|found| !expected.contains(found));
        let missing = expected.iter().filter(|held| !found.contains(held));
        panic!(
            "{context}: left behind {}\nholder's keys gone: {}",
            describe(extra, &log),
            describe(missing, &log)
        );
    }
    // ...still holding the holder's token: each release deletes on all of them.
    for lock in held {
        let key = lock.key().to_string();
        let released = lock.release().await;
        assert!(
            matches!(released, Ok(count) if count == blocking),
            "{context}: holder release of {key}: {released:?}"
        );
    }
    settle(&holder, &context).await;
    assert_swept(&cluster, "held-", &log, &context).await;
    summarize(&name, seed, &log, &window, started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contended_acquires_dropped_at_random_times_leave_only_the_holder_on_3() {
    contended_random_drops_leave_only_the_holder(3, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contended_acquires_dropped_at_random_times_leave_only_the_holder_on_5() {
    contended_random_drops_leave_only_the_holder(5, 120).await;
}

/// One server SIGSTOPped throughout: the set sent to it stays unanswered, so
/// every dropped attempt leaves a reply outstanding there. The live instances
/// must be cleaned without waiting for it; after resuming, all of them.
async fn paused_random_drops_leave_no_key(n: usize, iterations: usize) {
    let seed = seed();
    let name = format!("paused n = {n}");
    let mut rng = stream(seed, 0x200 + n as u64);
    let mut cluster = cluster(n);
    let locker = common::locker(&cluster).await;
    locker.prepare().await.unwrap();
    let latency = uncontended_latency(&locker, "probe-").await;
    let paused = rng.usize(0..n);
    let name = format!("{name}, instance {paused} paused");
    cluster.pause(paused).unwrap();
    let mut window = Window::new(latency * 2);
    let mut log = Vec::with_capacity(iterations);
    let started = Instant::now();
    for i in 0..iterations {
        let key = format!("stalled-{i}");
        let call = Call::draw(&mut rng, &window);
        let (result, elapsed) = call.run(&locker, &key).await;
        let ending = match result {
            None => Ending::Dropped,
            Some(Ok(lock)) => {
                // A quorum of live instances answers; the paused one's delete
                // waits in the background.
                let released = tokio::time::timeout(SETTLE_BOUND, lock.release()).await;
                assert!(
                    matches!(released, Ok(Ok(count)) if count >= 1),
                    "{name}: seed {seed:#x}: release of {key}: {released:?}"
                );
                Ending::Won
            }
            Some(Err(err)) => panic!("{name}: seed {seed:#x}: {call:?} {key}: {err}"),
        };
        window.record(ending);
        log.push(Entry {
            key,
            call,
            elapsed,
            ending,
        });
    }
    let context = format!("{name}: seed {seed:#x}, latency {latency:?}");
    // The premise: replies from the paused server are outstanding, so background
    // work cannot have finished.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), locker.settle())
            .await
            .is_err(),
        "{context}: settled with a server paused: no reply was outstanding"
    );
    // The live instances are cleaned without waiting for the paused one.
    let live_deadline = Instant::now() + SETTLE_BOUND;
    loop {
        let mut left = Vec::new();
        for i in (0..n).filter(|&i| i != paused) {
            let keys = cluster.keys(i, "stalled-*").await.expect("SCAN");
            left.extend(keys.into_iter().map(|key| (i, key)));
        }
        if left.is_empty() {
            break;
        }
        if Instant::now() > live_deadline {
            cluster.resume(paused).unwrap();
            panic!(
                "{context}: after {SETTLE_BOUND:?} live instances still hold {}",
                describe(&left, &log)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.resume(paused).unwrap();
    settle(&locker, &context).await;
    assert_swept(&cluster, "stalled-", &log, &context).await;
    summarize(&name, seed, &log, &window, started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquires_dropped_at_random_times_with_a_paused_instance_leave_no_key_on_3() {
    paused_random_drops_leave_no_key(3, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquires_dropped_at_random_times_with_a_paused_instance_leave_no_key_on_5() {
    paused_random_drops_leave_no_key(5, 120).await;
}
