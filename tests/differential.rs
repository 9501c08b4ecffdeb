//! Differential test: a locker over one [`MemoryInstance`] against a locker over
//! one real `redis-server` running quorumlock's scripts (Redis is the reference).
//!
//! Proptest generates short sequences of operations on a few keys, so that they
//! collide: acquisitions (one attempt or a short wait; with or without a
//! caller-chosen token, which makes a re-take of one's own lock the `RETAKE`
//! script; with metadata; fenced), extends, releases, drops (then `settle`),
//! naps and sleeps past every TTL, tampering by another client (delete or
//! overwrite the lock key or its fencing counter, delete the epoch hash as a
//! flush would) and a restart without persistence. Each step runs on both
//! sides at once, and after each the test asserts that both answered the same
//! (a normalised description: the result's variant, the shortfall, each vote's
//! kind, fencing tokens, counts) and that both hold the same keys under the
//! case's prefix: the same values (random tokens and nonces renamed, in order
//! of first appearance, on each side) and TTLs within [`TOLERANCE`].
//!
//! # How the timing is made deterministic enough
//!
//! Both sides run on the wall clock, so a step whose outcome is decided within
//! a few milliseconds of an expiry could go either way. Three rules keep every
//! step away from that:
//!
//! - Sleeps are either naps of at most [`NAP_MAX_MS`] (well below the TTLs) or
//!   [`PAST_TTLS`] (well above the longest TTL, so that everything with a TTL
//!   has expired on both sides).
//! - Before a step that depends on a key (an acquire, extend, release, drop or
//!   tamper of that key) the runner reads the PTTL of the lock key and of its
//!   fencing counter on both sides, and for an extend the remaining validity
//!   of both lock handles. If any of them is within [`GUARD`] of running out
//!   (plus the wait of a waiting acquire), it first sleeps until it has run
//!   out on both sides, plus [`SETTLE`]. So no step starts within `GUARD` of an
//!   expiry that matters to it, and a step takes a few milliseconds.
//! - The state comparison accepts a key present on one side only when its
//!   PTTL there is at most [`TOLERANCE`] (it is about to expire; the other side
//!   expired it first), and the memory side is read between listing the Redis
//!   keys and reading them in one pipelined round trip.
//!
//! The lockers' background work is made to match too: every step ends with
//! `settle()` on both, both lockers are `prepare()`d before the first step, a
//! generous instance timeout keeps a slow reply from timing out, and after a
//! restart, an epoch deletion or any failed vote the runner calls `health()`
//! on both until both have probed the instance since (and, where the restart
//! check is on and the instance lost its keys, both have quarantined it; after
//! a restart, both have measured its clock again), so neither locker's next
//! step depends on when its background probe ran.
//!
//! What is not compared: the epoch hash's fields (a `MemoryInstance` does not
//! show them; they act through the quarantines above), error texts (a script
//! error reads differently from the memory instance's), and the number of
//! attempts a waiting acquire made.
//!
//! `DIFFERENTIAL_CASES` sets the number of cases (default 24, up to 12 steps
//! each); `DIFFERENTIAL_LOG` prints every case's steps.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use quorumlock::testing::RedisServer;
use quorumlock::{
    Error, Lock, LockValue, MemoryInstance, Quarantine, QuorumLocker, Shortfall, Vote, EPOCH_KEY,
    FENCE_SUFFIX,
};
use redis::aio::MultiplexedConnection;
use tokio::time::{sleep, Instant};

/// The lock keys (after the case's prefix): few, so that operations collide.
const KEYS: [&str; 2] = ["a", "b"];
/// Caller-chosen tokens; the second starts with the first, which must not make
/// it the first's owner.
const TOKENS: [&str; 2] = ["tok-a", "tok-ab"];
const METADATA: [&str; 2] = ["pid=7", "host=x y"];
/// The TTLs of acquisitions and extends.
const TTLS_MS: [u64; 4] = [30, 60, 120, 250];
/// TTLs the locker refuses before any I/O: zero, and not above the drift
/// allowance.
const BAD_TTLS_MS: [u64; 2] = [0, 2];
/// Values another client plants under a lock key: a foreign owner, a foreign
/// nonce with our token (a re-take takes it), our bare token without a nonce
/// and a token that merely starts with ours (a re-take must leave both).
const PLANTED: [&str; 4] = [
    "intruder n0nce",
    "tok-a n0nce planted",
    "tok-a",
    "tok-ab n0nce",
];
/// What a planted value expires after, where it has a TTL.
const PLANT_TTL_MS: u64 = 200;
/// Values another client writes into a fencing counter: INCR accepts only
/// canonical signed 64-bit integers, a script answering 0 or -1 means
/// something to the locker, and from 2^53 the scripts' Lua rounds the counter.
const FENCES: [&str; 12] = [
    "7",
    "0",
    "-1",
    "-2",
    "-7",
    "007",
    "+3",
    "x",
    "9223372036854775807",
    "18446744073709551615",
    "9007199254740991",
    "1152921504606846976",
];
/// How long a waiting acquire waits.
const WAIT: Duration = Duration::from_millis(20);
/// The longest nap: well below the shortest TTL.
const NAP_MAX_MS: u64 = 10;
/// The long sleep: well above the longest TTL and the planted TTL.
const PAST_TTLS: Duration = Duration::from_millis(250 + 40);
/// No step starts while an expiry that matters to it is this close.
const GUARD: Duration = Duration::from_millis(40);
/// Margin after an expiry the guard waited for.
const SETTLE: Duration = Duration::from_millis(15);
/// How far the two sides' PTTLs of one key may differ.
const TOLERANCE: Duration = Duration::from_millis(20);
const DEFAULT_CASES: u32 = 24;
const MAX_STEPS: usize = 12;
/// How long the runner waits for a locker to see an instance again.
const RESYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// Above the 40 ms the lockers keep between two samples of a clock.
const CLOCK_SAMPLES_APART: Duration = Duration::from_millis(45);

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

// --- Operations -------------------------------------------------------------

#[derive(Debug, Clone)]
struct Acquire {
    key: usize,
    ttl_ms: u64,
    token: Option<usize>,
    metadata: Option<usize>,
    fenced: bool,
    /// `acquire` with a short wait rather than `try_acquire`.
    wait: bool,
}

#[derive(Debug, Clone)]
enum Tamper {
    /// `DEL` the lock key.
    Delete,
    /// `SET` the lock key to `PLANTED[value]`, with `PLANT_TTL_MS` or no TTL.
    Plant { value: usize, ttl: bool },
    /// `SET` the lock key to the value it holds, with `PLANT_TTL_MS` or no TTL.
    Replant { ttl: bool },
    /// `DEL` the fencing counter.
    DeleteFence,
    /// `SET` the fencing counter to `FENCES[value]`, without a TTL.
    PlantFence { value: usize },
}

#[derive(Debug, Clone)]
enum Op {
    Acquire(Acquire),
    /// Extend the lock handle `lock % handles`.
    Extend {
        lock: usize,
        ttl_ms: u64,
    },
    Release {
        lock: usize,
    },
    /// Drop the handle without releasing it (the drop releases it in the
    /// background; the step then settles).
    Drop {
        lock: usize,
    },
    Nap {
        ms: u64,
    },
    SleepPastTtls,
    Tamper {
        key: usize,
        tamper: Tamper,
    },
    /// `DEL` the epoch hash, as a flush would.
    DeleteEpoch,
    /// Restart without persistence.
    Restart,
}

/// One case: the lockers' settings and the steps.
#[derive(Debug, Clone)]
struct Case {
    /// The restart check on (`restart_quarantine` non-zero: grants run the
    /// epoch-checking scripts) or off (plain `SET NX PX`, no quarantine).
    checks: bool,
    /// `wake_waiters`: releases run `RELEASE_PUBLISH` instead of `RELEASE`.
    wake: bool,
    ops: Vec<Op>,
}

fn ttl_ms() -> impl Strategy<Value = u64> {
    prop_oneof![
        12 => prop::sample::select(TTLS_MS.to_vec()),
        1 => prop::sample::select(BAD_TTLS_MS.to_vec()),
    ]
}

fn tamper() -> impl Strategy<Value = Tamper> {
    prop_oneof![
        2 => Just(Tamper::Delete),
        3 => (0..PLANTED.len(), any::<bool>()).prop_map(|(value, ttl)| Tamper::Plant { value, ttl }),
        2 => any::<bool>().prop_map(|ttl| Tamper::Replant { ttl }),
        1 => Just(Tamper::DeleteFence),
        3 => (0..FENCES.len()).prop_map(|value| Tamper::PlantFence { value }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let acquire = (
        0..KEYS.len(),
        ttl_ms(),
        prop::option::of(0..TOKENS.len()),
        prop::option::weighted(0.3, 0..METADATA.len()),
        prop::bool::weighted(0.4),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(key, ttl_ms, token, metadata, fenced, wait)| {
            Op::Acquire(Acquire {
                key,
                ttl_ms,
                token,
                metadata,
                fenced,
                wait,
            })
        });
    // A lone instance that lost its keys stays quarantined for the rest of
    // the case where the restart check is on: those two are rare.
    prop_oneof![
        12 => acquire,
        4 => (0..8usize, ttl_ms()).prop_map(|(lock, ttl_ms)| Op::Extend { lock, ttl_ms }),
        3 => (0..8usize).prop_map(|lock| Op::Release { lock }),
        2 => (0..8usize).prop_map(|lock| Op::Drop { lock }),
        2 => (1..=NAP_MAX_MS).prop_map(|ms| Op::Nap { ms }),
        1 => Just(Op::SleepPastTtls),
        6 => (0..KEYS.len(), tamper()).prop_map(|(key, tamper)| Op::Tamper { key, tamper }),
        1 => Just(Op::DeleteEpoch),
        1 => Just(Op::Restart),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::bool::weighted(0.6),
        any::<bool>(),
        prop::collection::vec(op(), 1..=MAX_STEPS),
    )
        .prop_map(|(checks, wake, ops)| Case { checks, wake, ops })
}

// --- Normalised descriptions ------------------------------------------------

/// Renames what is random on one side (32-hex-digit tokens, 8-hex-digit
/// nonces) by order of first appearance, so that the two sides' values compare.
#[derive(Default)]
struct Names {
    tokens: HashMap<String, usize>,
    nonces: HashMap<String, usize>,
}

fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|byte| byte.is_ascii_hexdigit())
}

impl Names {
    fn token(&mut self, token: &str) -> String {
        if !is_hex(token, 32) {
            return token.to_string();
        }
        let next = self.tokens.len();
        format!(
            "<token{}>",
            self.tokens.entry(token.to_string()).or_insert(next)
        )
    }

    fn nonce(&mut self, nonce: &str) -> String {
        if !is_hex(nonce, 8) {
            return nonce.to_string();
        }
        let next = self.nonces.len();
        format!(
            "<nonce{}>",
            self.nonces.entry(nonce.to_string()).or_insert(next)
        )
    }

    fn value(&mut self, raw: &str) -> String {
        let Some(value) = LockValue::parse(raw) else {
            return raw.to_string();
        };
        let mut named = format!("{} {}", self.token(value.token), self.nonce(value.nonce));
        if let Some(metadata) = value.metadata {
            write!(named, " {metadata}").unwrap();
        }
        named
    }
}

fn describe_vote(vote: &Vote) -> String {
    match vote {
        Vote::Granted => "granted".into(),
        Vote::Refused => "refused".into(),
        // The texts differ (a script error is wrapped by Redis); whether the
        // connection-level path was taken (an I/O kind: a broken connection,
        // or a grant refused because the epoch changed) must not.
        Vote::Failed(err) if err.is_io_error() => "failed(io)".into(),
        Vote::Failed(_) => "failed(reply)".into(),
        Vote::TimedOut(_) => "timed out".into(),
        Vote::Unanswered => "unanswered".into(),
        Vote::Quarantined(why) => format!(
            "quarantined({})",
            match why {
                Quarantine::Restarted { .. } => "restarted",
                Quarantine::Unverified => "unverified",
                Quarantine::ClockDrift { .. } => "clock drift",
                Quarantine::Unidentified => "unidentified",
                Quarantine::ClockUnmeasured => "clock unmeasured",
                Quarantine::Duplicate { .. } => "duplicate",
                Quarantine::Backlog { .. } => "backlog",
                _ => "other",
            }
        ),
        _ => format!("{vote}"),
    }
}

fn describe_votes(causes: &[quorumlock::InstanceVote]) -> String {
    let votes: Vec<String> = causes
        .iter()
        .map(|cause| describe_vote(&cause.vote))
        .collect();
    votes.join(", ")
}

fn describe_shortfall(shortfall: &Shortfall) -> String {
    match shortfall {
        Shortfall::TooFewVotes { granted, needed } => format!("{granted} of {needed} granted"),
        Shortfall::ValidityExhausted { .. } => "validity exhausted".into(),
        Shortfall::FenceNotWritten {
            acknowledged,
            needed,
        } => format!("fence written on {acknowledged} of {needed}"),
        _ => format!("{shortfall}"),
    }
}

fn describe_error(err: &Error) -> String {
    match err {
        Error::NotAcquired {
            shortfall, causes, ..
        } => format!(
            "NotAcquired({}; {})",
            describe_shortfall(shortfall),
            describe_votes(causes)
        ),
        Error::NotExtended {
            shortfall, causes, ..
        } => format!(
            "NotExtended({}; {})",
            describe_shortfall(shortfall),
            describe_votes(causes)
        ),
        Error::NotHeld { .. } => "NotHeld".into(),
        Error::LockLost { source, .. } => match source {
            Some(source) => format!("LockLost({})", describe_error(source)),
            None => "LockLost".into(),
        },
        Error::Unavailable {
            operation, causes, ..
        } => format!("Unavailable({operation}; {})", describe_votes(causes)),
        Error::InvalidTtl { reason, .. } => format!("InvalidTtl({reason})"),
        other => format!("{other}"),
    }
}

fn describe_lock(lock: &Lock, names: &mut Names) -> String {
    format!(
        "acquired(token {}, fencing {:?}, metadata {:?})",
        names.token(lock.token()),
        lock.fencing_token(),
        lock.metadata()
    )
}

// --- The two sides ------------------------------------------------------------

/// One lock, as each side's locker granted it.
struct Held {
    key: usize,
    memory: Lock,
    redis: Lock,
}

/// A key's state on one side.
#[derive(Debug)]
struct Stored {
    value: String,
    /// `None`: no TTL.
    pttl: Option<Duration>,
}

/// The server shared by a test's cases, and a counter for their key prefixes.
struct Fixture {
    server: Arc<Mutex<RedisServer>>,
    url: String,
    cases: AtomicUsize,
    name: &'static str,
}

impl Fixture {
    fn start(name: &'static str) -> Self {
        let server = RedisServer::start().expect("start redis-server");
        let url = server.url();
        Self {
            server: Arc::new(Mutex::new(server)),
            url,
            cases: AtomicUsize::new(0),
            name,
        }
    }
}

struct World<'f> {
    fixture: &'f Fixture,
    case: Case,
    prefix: String,
    memory: MemoryInstance,
    memory_locker: QuorumLocker,
    redis_locker: QuorumLocker,
    client: redis::Client,
    connection: MultiplexedConnection,
    held: Vec<Held>,
    memory_names: Names,
    redis_names: Names,
    /// What each step did on each side, for the failure message.
    log: String,
}

/// What the lockers must have seen of the instance before the next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resync {
    /// A probe since now: it clears the suspicion a failed request left.
    Probe,
    /// It lost its keys: where the restart check is on, both quarantined it.
    LostKeys,
    /// It restarted: it lost its keys, and its clock is measured afresh.
    Restarted,
}

/// The outcome of one step: each side's normalised description, and what the
/// lockers must see before the next step.
struct Outcome {
    memory: String,
    redis: String,
    resync: Option<Resync>,
}

impl Outcome {
    fn same(description: &str) -> Self {
        Self {
            memory: description.to_string(),
            redis: description.to_string(),
            resync: None,
        }
    }
}

async fn acquire(locker: &QuorumLocker, spec: &Acquire) -> quorumlock::Result<Lock> {
    let mut request = locker.lock(KEYS[spec.key]).ttl(ms(spec.ttl_ms));
    if let Some(token) = spec.token {
        request = request.token(TOKENS[token]);
    }
    if let Some(metadata) = spec.metadata {
        request = request.metadata(METADATA[metadata]);
    }
    if spec.fenced {
        request = request.fenced();
    }
    if spec.wait {
        request.wait(WAIT).acquire().await
    } else {
        request.try_acquire().await
    }
}

impl<'f> World<'f> {
    async fn new(fixture: &'f Fixture, case: Case) -> World<'f> {
        let n = fixture.cases.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{}{n}:", fixture.name);
        let memory = MemoryInstance::new("memory");
        let configure = |builder: quorumlock::Builder| {
            builder
                .key_prefix(prefix.clone())
                // A slow reply on a loaded machine must not time out on one side.
                .instance_timeout(Duration::from_secs(2))
                // Where on: longer than any case, so that `quarantined_for`
                // reports a quarantine for the rest of it.
                .restart_quarantine(if case.checks {
                    Duration::from_secs(60)
                } else {
                    Duration::ZERO
                })
                .wake_waiters(case.wake)
        };
        let memory_locker = configure(QuorumLocker::builder().memory(&memory))
            .build()
            .await
            .expect("build the memory locker");
        let redis_locker = configure(QuorumLocker::builder().url(fixture.url.clone()))
            .build()
            .await
            .expect("build the redis locker");
        let (memory_ready, redis_ready) =
            tokio::join!(memory_locker.prepare(), redis_locker.prepare());
        memory_ready.expect("prepare the memory locker");
        redis_ready.expect("prepare the redis locker");
        let client = redis::Client::open(fixture.url.as_str()).expect("redis client");
        let connection = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis");
        World {
            fixture,
            case,
            prefix,
            memory,
            memory_locker,
            redis_locker,
            client,
            connection,
            held: Vec::new(),
            memory_names: Names::default(),
            redis_names: Names::default(),
            log: String::new(),
        }
    }

    fn key(&self, key: usize) -> String {
        format!("{}{}", self.prefix, KEYS[key])
    }

    fn fence(&self, key: usize) -> String {
        format!("{}{}{FENCE_SUFFIX}", self.prefix, KEYS[key])
    }

    fn epoch(&self) -> String {
        format!("{}{EPOCH_KEY}", self.prefix)
    }

    async fn redis<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> T {
        cmd.query_async(&mut self.connection)
            .await
            .unwrap_or_else(|err| panic!("{cmd:?} on the test's own connection: {err}"))
    }

    async fn redis_pttl(&mut self, key: &str) -> Option<Duration> {
        let pttl: i64 = self.redis(redis::cmd("PTTL").arg(key)).await;
        u64::try_from(pttl).ok().map(ms)
    }

    /// Sleeps past every expiry that matters to a step on `key` (and lock
    /// `lock`) and is within `GUARD + extra` of now on either side.
    async fn guard(&mut self, key: usize, lock: Option<usize>, extra: Duration) {
        let near = GUARD + extra;
        loop {
            let mut left = Vec::new();
            for name in [self.key(key), self.fence(key)] {
                left.push(self.memory.pttl(&name));
                left.push(self.redis_pttl(&name).await);
            }
            if let Some(held) = lock.map(|lock| &self.held[lock]) {
                left.push(Some(held.memory.remaining()));
                left.push(Some(held.redis.remaining()));
            }
            let close = left
                .into_iter()
                .flatten()
                .filter(|left| !left.is_zero() && *left <= near)
                .max();
            match close {
                Some(left) => sleep(left + SETTLE).await,
                None => return,
            }
        }
    }

    /// Runs one step on both sides and returns what each did.
    async fn apply(&mut self, op: &Op) -> Outcome {
        match op {
            Op::Acquire(spec) => {
                let extra = if spec.wait { WAIT } else { Duration::ZERO };
                self.guard(spec.key, None, extra).await;
                let (memory, redis) = tokio::join!(
                    acquire(&self.memory_locker, spec),
                    acquire(&self.redis_locker, spec)
                );
                let outcome = Outcome {
                    memory: match &memory {
                        Ok(lock) => describe_lock(lock, &mut self.memory_names),
                        Err(err) => describe_error(err),
                    },
                    redis: match &redis {
                        Ok(lock) => describe_lock(lock, &mut self.redis_names),
                        Err(err) => describe_error(err),
                    },
                    resync: None,
                };
                if let (Ok(memory), Ok(redis)) = (memory, redis) {
                    self.held.push(Held {
                        key: spec.key,
                        memory,
                        redis,
                    });
                }
                outcome
            }
            Op::Extend { lock, ttl_ms } => {
                let Some(lock) = self.pick(*lock) else {
                    return Outcome::same("no lock");
                };
                self.guard(self.held[lock].key, Some(lock), Duration::ZERO)
                    .await;
                let held = &self.held[lock];
                let (memory, redis) = tokio::join!(
                    held.memory.extend(ms(*ttl_ms)),
                    held.redis.extend(ms(*ttl_ms))
                );
                let describe = |result: &quorumlock::Result<Duration>| match result {
                    Ok(validity) if *validity <= ms(*ttl_ms) => "extended".to_string(),
                    Ok(validity) => format!("extended for {validity:?}, beyond the TTL"),
                    Err(err) => describe_error(err),
                };
                Outcome {
                    memory: describe(&memory),
                    redis: describe(&redis),
                    resync: None,
                }
            }
            Op::Release { lock } => {
                let Some(lock) = self.pick(*lock) else {
                    return Outcome::same("no lock");
                };
                self.guard(self.held[lock].key, None, Duration::ZERO).await;
                let held = self.held.remove(lock);
                let (memory, redis) = tokio::join!(held.memory.release(), held.redis.release());
                let describe = |result: &quorumlock::Result<usize>| match result {
                    Ok(released) => format!("released on {released}"),
                    Err(err) => describe_error(err),
                };
                Outcome {
                    memory: describe(&memory),
                    redis: describe(&redis),
                    resync: None,
                }
            }
            Op::Drop { lock } => {
                let Some(lock) = self.pick(*lock) else {
                    return Outcome::same("no lock");
                };
                self.guard(self.held[lock].key, None, Duration::ZERO).await;
                drop(self.held.remove(lock));
                Outcome::same("dropped")
            }
            Op::Nap { ms: nap } => {
                sleep(ms(*nap)).await;
                Outcome::same("napped")
            }
            Op::SleepPastTtls => {
                sleep(PAST_TTLS).await;
                Outcome::same("slept")
            }
            Op::Tamper { key, tamper } => {
                self.guard(*key, None, Duration::ZERO).await;
                self.tamper(*key, tamper).await
            }
            Op::DeleteEpoch => {
                let epoch = self.epoch();
                let memory = self.memory.remove(&epoch);
                let redis: i64 = self.redis(redis::cmd("DEL").arg(&epoch)).await;
                Outcome {
                    memory: format!("deleted the epoch: {memory}"),
                    redis: format!("deleted the epoch: {}", redis == 1),
                    resync: Some(Resync::LostKeys),
                }
            }
            Op::Restart => {
                let server = Arc::clone(&self.fixture.server);
                tokio::task::spawn_blocking(move || {
                    server
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .restart_empty()
                })
                .await
                .expect("restart task")
                .expect("restart redis-server");
                self.memory.restart_empty();
                self.connection = self
                    .client
                    .get_multiplexed_async_connection()
                    .await
                    .expect("reconnect to redis");
                Outcome {
                    resync: Some(Resync::Restarted),
                    ..Outcome::same("restarted")
                }
            }
        }
    }

    fn pick(&self, lock: usize) -> Option<usize> {
        (!self.held.is_empty()).then(|| lock % self.held.len())
    }

    async fn tamper(&mut self, key: usize, tamper: &Tamper) -> Outcome {
        let lock_key = self.key(key);
        let fence = self.fence(key);
        let ttl = |on: bool| on.then_some(ms(PLANT_TTL_MS));
        let set = |key: &str, value: &str, ttl: Option<Duration>| {
            let mut cmd = redis::cmd("SET");
            cmd.arg(key).arg(value);
            if let Some(ttl) = ttl {
                cmd.arg("PX").arg(ttl.as_millis() as u64);
            }
            cmd
        };
        match tamper {
            Tamper::Delete | Tamper::DeleteFence => {
                let name = if matches!(tamper, Tamper::Delete) {
                    lock_key
                } else {
                    fence
                };
                let memory = self.memory.remove(&name);
                let redis: i64 = self.redis(redis::cmd("DEL").arg(&name)).await;
                Outcome {
                    memory: format!("deleted: {memory}"),
                    redis: format!("deleted: {}", redis == 1),
                    resync: None,
                }
            }
            Tamper::Plant { value, ttl: with } => {
                self.memory.set(&lock_key, PLANTED[*value], ttl(*with));
                let () = self
                    .redis(&set(&lock_key, PLANTED[*value], ttl(*with)))
                    .await;
                Outcome::same("planted")
            }
            Tamper::PlantFence { value } => {
                self.memory.set(&fence, FENCES[*value], None);
                let () = self.redis(&set(&fence, FENCES[*value], None)).await;
                Outcome::same("planted")
            }
            Tamper::Replant { ttl: with } => {
                let memory = match self.memory.get(&lock_key) {
                    Some(value) => {
                        self.memory.set(&lock_key, &value, ttl(*with));
                        "replanted"
                    }
                    None => "absent",
                };
                let held: Option<String> = self.redis(redis::cmd("GET").arg(&lock_key)).await;
                let redis = match held {
                    Some(value) => {
                        let () = self.redis(&set(&lock_key, &value, ttl(*with))).await;
                        "replanted"
                    }
                    None => "absent",
                };
                Outcome {
                    memory: memory.into(),
                    redis: redis.into(),
                    resync: None,
                }
            }
        }
    }

    /// Waits until both lockers have seen what `resync` asks: a probe since
    /// now (which clears a suspicion a failure left); where the instance lost
    /// its keys and the restart check is on, both have quarantined it; where
    /// it restarted, both have measured its clock again.
    ///
    /// Waiting for the clock matters where the check is off (with it on, the
    /// quarantine of a lone instance outlasts the case): a restart that
    /// `health()` notices resets the clock's measurement without waking the
    /// monitor's quicker pace, while one the monitor noticed itself (its probes
    /// failed while the server was down) is measured again within 100 ms. A
    /// clock rate shows after two samples 40 ms apart, the bound votes need
    /// after three: `health()` takes one sample each, so the runner takes two
    /// more after the rate shows.
    async fn resync(&self, resync: Resync) -> Result<(), String> {
        let wait_for = |locker: &QuorumLocker| {
            let locker = locker.clone();
            let want_quarantine = resync != Resync::Probe && self.case.checks;
            async move {
                let deadline = Instant::now() + RESYNC_TIMEOUT;
                let mut samples_after_rate = 0;
                loop {
                    let health = locker.health().await;
                    let instance = &health.instances()[0];
                    let seen = instance.is_reachable()
                        && (!want_quarantine || instance.quarantined_for.is_some());
                    if seen && resync == Resync::Restarted && instance.clock_rate.is_some() {
                        samples_after_rate += 1;
                    }
                    if seen && (resync != Resync::Restarted || samples_after_rate > 2) {
                        return Ok(());
                    }
                    if Instant::now() > deadline {
                        return Err(format!(
                            "the locker did not see the instance again: {health}"
                        ));
                    }
                    sleep(CLOCK_SAMPLES_APART).await;
                }
            }
        };
        let (memory, redis) =
            tokio::join!(wait_for(&self.memory_locker), wait_for(&self.redis_locker));
        memory.map_err(|err| format!("memory: {err}"))?;
        redis.map_err(|err| format!("redis: {err}"))
    }

    /// Every key under the prefix but the epoch hash, on each side.
    async fn snapshot(&mut self) -> (BTreeMap<String, Stored>, BTreeMap<String, Stored>) {
        let epoch = self.epoch();
        let mut names: BTreeSet<String> = self.memory.keys().into_iter().collect();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = self
                .redis(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(format!("{}*", self.prefix))
                        .arg("COUNT")
                        .arg(1000),
                )
                .await;
            names.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        names.remove(&epoch);
        // The memory side just before the Redis side's one round trip.
        let memory = names
            .iter()
            .filter_map(|name| {
                let value = self.memory.get(name)?;
                let pttl = self.memory.pttl(name);
                Some((name.clone(), Stored { value, pttl }))
            })
            .collect();
        let mut pipe = redis::pipe();
        for name in &names {
            pipe.cmd("GET").arg(name).cmd("PTTL").arg(name);
        }
        let answers: Vec<(Option<String>, i64)> = if names.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut self.connection)
                .await
                .expect("GET and PTTL")
        };
        let redis = names
            .iter()
            .zip(answers)
            .filter_map(|(name, (value, pttl))| {
                let value = value?;
                let pttl = u64::try_from(pttl).ok().map(ms);
                Some((name.clone(), Stored { value, pttl }))
            })
            .collect();
        (memory, redis)
    }

    /// Compares the keys on both sides; `Err` describes the first difference.
    async fn compare_state(&mut self) -> Result<String, String> {
        let (memory, redis) = self.snapshot().await;
        let names: BTreeSet<&String> = memory.keys().chain(redis.keys()).collect();
        let mut shown = String::new();
        for name in names {
            let short = name.strip_prefix(&self.prefix).unwrap_or(name);
            match (memory.get(name), redis.get(name)) {
                (Some(m), Some(r)) => {
                    let (mv, rv) = (
                        self.memory_names.value(&m.value),
                        self.redis_names.value(&r.value),
                    );
                    write!(shown, " {short}={mv:?}/{:?}", m.pttl).unwrap();
                    if mv != rv {
                        return Err(format!("{short}: memory holds {mv:?}, redis {rv:?}"));
                    }
                    let ttl_matches = match (m.pttl, r.pttl) {
                        (None, None) => true,
                        (Some(a), Some(b)) => a.abs_diff(b) <= TOLERANCE,
                        _ => false,
                    };
                    if !ttl_matches {
                        return Err(format!(
                            "{short}: PTTL {:?} in memory, {:?} in redis",
                            m.pttl, r.pttl
                        ));
                    }
                }
                (Some(one), None) | (None, Some(one)) => {
                    // About to expire: the other side expired it first.
                    if one.pttl.is_none_or(|pttl| pttl > TOLERANCE) {
                        let side = if memory.contains_key(name) {
                            "memory"
                        } else {
                            "redis"
                        };
                        return Err(format!("{short}: only {side} holds it: {one:?}"));
                    }
                }
                (None, None) => unreachable!(),
            }
        }
        Ok(shown)
    }

    /// Runs the case; `Err` on the first difference.
    async fn run(mut self) -> Result<(), TestCaseError> {
        let ops = self.case.ops.clone();
        let result = self.run_steps(&ops).await;
        // Whatever happened, leave no background work behind.
        self.held.clear();
        tokio::join!(self.memory_locker.settle(), self.redis_locker.settle());
        if std::env::var_os("DIFFERENTIAL_LOG").is_some() {
            eprintln!("case {} {:?}\n{}", self.prefix, self.case.checks, self.log);
        }
        result.map_err(|difference| {
            TestCaseError::fail(format!(
                "{difference}\nsteps (memory / redis):\n{}",
                self.log
            ))
        })
    }

    async fn run_steps(&mut self, ops: &[Op]) -> Result<(), String> {
        for (i, op) in ops.iter().enumerate() {
            let outcome = self.apply(op).await;
            self.check_step(i, &format!("{op:?}"), outcome).await?;
        }
        // The end of the case: every handle left is dropped, so released.
        if !self.held.is_empty() {
            // Every key's expiry matters now: sleep past what is close.
            for key in 0..KEYS.len() {
                self.guard(key, None, Duration::ZERO).await;
            }
            self.held.clear();
            self.check_step(ops.len(), "drop every handle", Outcome::same("dropped"))
                .await?;
        }
        Ok(())
    }

    async fn check_step(&mut self, i: usize, op: &str, outcome: Outcome) -> Result<(), String> {
        tokio::join!(self.memory_locker.settle(), self.redis_locker.settle());
        let failed = |description: &str| description.contains("failed(");
        let resync = outcome
            .resync
            .or((failed(&outcome.memory) || failed(&outcome.redis)).then_some(Resync::Probe));
        if let Some(resync) = resync {
            self.resync(resync).await?;
        }
        writeln!(
            self.log,
            "{i:>3}. {op}\n     {} / {}",
            outcome.memory, outcome.redis
        )
        .unwrap();
        if outcome.memory != outcome.redis {
            return Err(format!(
                "step {i} ({op}) answered differently:\n  memory: {}\n  redis:  {}",
                outcome.memory, outcome.redis
            ));
        }
        let state = self
            .compare_state()
            .await
            .map_err(|difference| format!("after step {i} ({op}) the keys differ: {difference}"))?;
        writeln!(self.log, "     keys:{state}").unwrap();
        Ok(())
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn cases() -> u32 {
    std::env::var("DIFFERENTIAL_CASES")
        .ok()
        .map(|cases| {
            cases
                .parse()
                .expect("DIFFERENTIAL_CASES: a number of cases")
        })
        .unwrap_or(DEFAULT_CASES)
}

#[test]
fn memory_instance_answers_as_redis_does() {
    let fixture = Fixture::start("d");
    let runtime = runtime();
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        // Each case costs real time: shrink for a while, not for ever.
        max_shrink_iters: 256,
        max_shrink_time: 120_000,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&case(), |case| {
        runtime.block_on(async { World::new(&fixture, case).await.run().await })
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, case)) => {
            panic!("memory and redis differ: {why}\nminimal case: {case:#?}")
        }
        Err(err) => panic!("{err}"),
    }
}

fn fixed_acquire(key: usize, fenced: bool) -> Op {
    Op::Acquire(Acquire {
        key,
        ttl_ms: 250,
        token: None,
        metadata: None,
        fenced,
        wait: false,
    })
}

/// The differences this test found, each as the case that shows it, so that
/// they stay covered whatever proptest generates.
#[test]
fn differences_found_stay_fixed() {
    let fixture = Fixture::start("f");
    let runtime = runtime();
    let mut cases = Vec::new();
    // `MemoryInstance::remove` of the epoch hash (an operator's `DEL`, or what
    // a flush loses) deleted nothing: the locker never noticed.
    for checks in [true, false] {
        cases.push(Case {
            checks,
            wake: false,
            ops: vec![
                fixed_acquire(0, false),
                Op::DeleteEpoch,
                fixed_acquire(1, false),
                Op::Release { lock: 0 },
            ],
        });
    }
    // INCR of a fencing counter someone overwrote: Redis takes only canonical
    // signed 64-bit integers (not "007" or "+3", nor past i64::MAX), and
    // increments negative ones, whose result the locker reads as a refusal
    // (0), a changed epoch (-1) or no counter at all.
    for (value, fence) in FENCES.iter().enumerate() {
        cases.push(Case {
            checks: !fence.starts_with('-'),
            wake: false,
            ops: vec![
                Op::Tamper {
                    key: 0,
                    tamper: Tamper::PlantFence { value },
                },
                fixed_acquire(0, true),
                fixed_acquire(0, true),
            ],
        });
    }
    let mut failures = Vec::new();
    for case in cases {
        let shown = format!("{case:?}");
        if let Err(why) = runtime.block_on(async { World::new(&fixture, case).await.run().await }) {
            failures.push(format!("{shown}\n{why}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
