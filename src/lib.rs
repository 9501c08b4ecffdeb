//! Distributed locks over N Redis instances with the Redlock quorum algorithm.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let cluster = quorumlock::testing::RedisCluster::start(3)?;
//! # let urls = cluster.urls();
//! # tokio::runtime::Runtime::new()?.block_on(async {
//! use std::time::Duration;
//! use quorumlock::QuorumLocker;
//!
//! // Three instances: a lock needs two of them.
//! let locker = QuorumLocker::builder().urls(urls).build().await?;
//!
//! let lock = locker.acquire("nightly-report", Duration::from_secs(30)).await?;
//! // ... do the work, finishing well before `lock.valid_until()` ...
//! assert!(locker.try_acquire("nightly-report", Duration::from_secs(30)).await.is_err());
//! lock.release().await?;
//! # Ok::<_, quorumlock::Error>(())
//! # })?;
//! # Ok(()) }
//! ```
//!
//! # The algorithm
//!
//! A [`QuorumLocker`] holds N instances in the order given. One attempt:
//!
//! 1. notes the time on this process's monotonic clock;
//! 2. sends `SET key token NX PX ttl` to every instance the locker trusts now
//!    (identified, clock measured, not restarted or stalled: see *Clock drift*
//!    and *Restarts*), at once, with a fresh 128-bit random token, each reply
//!    bounded by the per-instance timeout; each instance sets the key only if
//!    its data set is the one the locker verified;
//! 3. stops waiting as soon as the outcome is certain: won at the quorum-th grant
//!    (a majority by default), lost once more than `N − quorum` instances have
//!    refused, failed or timed out — or, when the first grants came from fast
//!    clocks, a moment later, for as long as the grants still out could make the
//!    lock last longer than the wait costs;
//! 4. computes the validity: the time the granting instances keep the key (each
//!    `ttl / its clock's rate bound`, see *Clock drift*) `− elapsed − (ttl ×
//!    drift_factor + 2 ms)`, never more than plain Redlock's `ttl − elapsed −
//!    drift`; the attempt is won only if a quorum granted and validity is left;
//! 5. otherwise removes its token, by compare-and-delete, from every instance that
//!    may hold it — those that granted, failed or timed out, and those whose reply
//!    is still in flight, once it arrives.
//!
//! [`QuorumLocker::acquire`] repeats attempts after randomised delays
//! ([`RetryPolicy`]) until its timeout; [`QuorumLocker::try_acquire`] makes one.
//! [`Lock::release`] runs compare-and-delete on every instance in parallel.
//!
//! # Keeping a lock
//!
//! - [`Lock::extend`] runs compare-and-pexpire on every instance in parallel,
//!   counts the quorum and recomputes the validity from its own start, like an
//!   acquire. A failed extend marks the lock lost; it never deletes a key.
//! - [`QuorumLocker::with_lock`] runs work under a lock that a watchdog extends
//!   every third of its TTL, cancels the work if the lock is lost, and releases the
//!   lock when the work ends (also on an error or a panic). [`Lock::auto_extend`]
//!   gives the same watchdog as a [`LockGuard`] for code that runs its own loop.
//! - [`LockStatus::lost`] resolves when the lock is no longer valid; a [`Lock`]
//!   and a [`LockGuard`] dereference to their [`LockStatus`], so `lock.lost()`
//!   and `guard.lost()` are the same call.
//! - Dropping a [`Lock`] or [`LockGuard`] without releasing it starts the release in
//!   the background, retried while the keys may still exist.
//! - [`QuorumLocker::lock`] takes per-call options: your own token (so a
//!   restarted process can take back its lock), metadata stored beside the token,
//!   how long to wait.
//! - [`QuorumLocker::health`] reports each instance's reachability, latency,
//!   `run_id` and clock; [`QuorumLocker::prepare`] also waits for the first
//!   measurements and refuses one server listed under two addresses.
//! - [`MemoryInstance`] is an in-process instance for unit tests of code that takes
//!   locks, and for simulating slow, failing, paused or drifting instances under
//!   Tokio's paused time.
//!
//! Every attempt, extend and release runs in a `tracing` span (`attempt`,
//! `extend`, `release`) with the key, the counts and the validity, and each
//! instance's answer is an event. Tokens appear abbreviated and passwords never.
//!
//! # What a lock guarantees
//!
//! A lock is for **efficiency, not correctness**: it keeps processes from doing
//! the same expensive work twice, and is exclusive only while these hold:
//!
//! - no server's clock speeds up, or jumps forward, faster than the locker can
//!   see: plain Redlock needs every clock within `1 / (1 − drift_factor)`;
//!   quorumlock bounds each server's clock rate from above and shortens the
//!   validity to match (see *Clock drift* below), which leaves a clock that
//!   speeds up between two probes, or steps forward, while a lock is held;
//! - the holder does not pause past [`LockStatus::valid_until`] (garbage collection, swap
//!   or a stopped VM would let it work on after the lock passed on);
//! - an instance that loses its keys (a restart without persistence, a flush, a
//!   failover to a replica that lacked them) does not vote until the longest TTL
//!   has passed: the locker quarantines it when it sees the loss (see
//!   *Restarts* below), which a locker that starts after the loss cannot;
//! - the instances are distinct servers: the builder refuses a repeated address,
//!   and an instance with the `run_id` or data set of an earlier one does not
//!   vote.
//!
//! Network delay costs only validity: it is counted from before the requests left.
//! docs/SAFETY.md in the repository has the fault suite's measured results.
//!
//! # Clock drift
//!
//! A server whose clock runs fast drops its keys early. If a grant came partly
//! from such servers, a second owner can collect a quorum once they drop the key,
//! while the first still believes its lock valid — plain Redlock overlaps there
//! even with a minority of fast servers. Each locker probes every instance's
//! `TIME` against its own monotonic clock (every
//! [`probe_every`](Builder::probe_every)) and bounds its rate from above: each
//! reply's `TIME` was read between the request leaving and the reply arriving,
//! so between two probes the server's clock advanced at most so much per second
//! of ours — no statistics, and a slow or stalled reply only loosens the bound.
//! A lock's validity then ends when no more than `N − quorum` of the instances
//! that granted it can still hold the key: the `(N − quorum + 1)`-th longest of
//! `ttl / bound` over the granting instances, minus the elapsed time and the
//! drift allowance, never more than the plain formula.
//!
//! An instance votes only once its clock has a bound: a new locker's first
//! attempt (or [`QuorumLocker::prepare`]) waits for three probes 40 ms apart,
//! about 85 ms. The bound starts loose by about the round trip over the
//! probes' span (0.2% of the TTL on loopback, 1% at a 0.5 ms round trip) and
//! tightens as the span grows to seconds. A clock stepped back (NTP correcting
//! a fast clock) is measured afresh, without a vote meanwhile, never trusted
//! more than before; a clock that speeds up shows in the next probe's interval.
//! [`Builder::quarantine_fast_clocks`] goes further and refuses votes from fast
//! clocks.
//!
//! # Restarts
//!
//! A Redis server restarted without persistence has forgotten the locks it held,
//! so its next vote could hand a lock to a second owner. A locker notices:
//!
//! - **in every grant**: on first contact it writes a random id into the hash
//!   [`EPOCH_KEY`] (after the key prefix; no TTL, one per server and prefix,
//!   like the fencing counters), and each grant's script checks, before
//!   setting anything, that the hash still holds that id and — where the
//!   connection could reconnect without failing a request (RESP3, a connection
//!   you made) — that the server's `run_id` is the one verified. A server that
//!   lost its keys (restarted empty, flushed) lost the hash too, and a replica
//!   promoted in a failover has another `run_id`, so neither grants, however
//!   the connection behaved (on the locker's own RESP2 connections a reconnect
//!   fails a request, and the instance does not vote until a probe has seen
//!   the new `run_id`);
//! - **at its probes**: the server's `run_id` or epoch changed.
//!
//! Either way the instance is kept out of acquisitions for
//! [`Builder::restart_quarantine`] (default: the default TTL) or the longest
//! TTL any locker has set on these servers, whichever is longer (the hash keeps
//! each server's longest TTL, raised by every grant and extend), by which time
//! every lock it could have held has expired. An instance whose connection failed does not
//! vote until a probe sent after the failure has reached it. A locker that
//! starts after the loss cannot tell, so give instances without persistence a
//! start-up delay of the longest TTL as well.
//!
//! What a server must allow: `EVALSHA` and `SCRIPT LOAD`, `INFO` (from scripts
//! too) and `TIME`, and `HSETNX`/`HMGET`/`HGET`/`HSET` on the epoch hash — an
//! ACL user needs those besides `SET`/`GET`/`DEL`/`PEXPIRE` on the lock keys.
//! An eviction policy that may evict lock keys (`allkeys-*`, or `volatile-*`,
//! which evicts keys with a TTL, lock keys among them, but never the epoch
//! hash) loses locks no check can see: give the lock servers `noeviction`.
//!
//! # Fencing tokens
//!
//! A lock alone cannot stop a holder that paused past its validity (a GC pause,
//! a stopped VM) from writing after the lock passed on. A fencing token can, if
//! the storage you protect helps: request the lock with
//! [`fenced()`](LockRequest::fenced), send [`LockStatus::fencing_token`] with every
//! write, and have the storage refuse a write whose token is lower than the
//! highest it has accepted.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! # let (a, b, c) = (quorumlock::MemoryInstance::new("a"), quorumlock::MemoryInstance::new("b"), quorumlock::MemoryInstance::new("c"));
//! # let locker = quorumlock::QuorumLocker::builder().memory(&a).memory(&b).memory(&c).build().await?;
//! # let mut highest_seen = 0;
//! let lock = locker.lock("ledger").fenced().acquire().await?;
//! let token = lock.fencing_token().expect("requested with fenced()");
//! // The storage, atomically: refuse a token below the highest accepted one.
//! if token >= highest_seen {
//!     highest_seen = token; // ... and apply the write
//! }
//! lock.release().await?;
//! # Ok::<_, quorumlock::Error>(())
//! # }).unwrap();
//! ```
//!
//! **How a token is made** (a quorum register over the N instances):
//!
//! 1. The attempt's one script per instance runs `SET key value NX PX ttl` and,
//!    only where it set the key, `INCR` the key's counter `key:fence`
//!    ([`FENCE_SUFFIX`]; the counter has no TTL: it is the one key quorumlock
//!    deliberately leaves behind, one per fenced lock key).
//! 2. If a quorum granted, the candidate token `t` is the largest counter the
//!    granting instances returned.
//! 3. A second round writes `t` back: on every granting instance, only while
//!    the lock key still holds this attempt's value, `counter = max(counter, t)`.
//!    The token is handed out only once a quorum acknowledged it, and the lock's
//!    validity still counts from the first round's start, so it includes the
//!    second round. Otherwise the attempt is lost and rolled back; the counters
//!    it advanced stay advanced, which is harmless: tokens must increase, not be
//!    dense.
//!
//! Taking the largest counter alone is not enough: an instance outside the
//! next quorum may hold the high count, and the next quorum could then return
//! only lower ones. The write-back puts `t` on a quorum, and every later quorum
//! meets that one.
//!
//! **The guarantee.** Let holder A be handed token `a` and a later holder B
//! token `b`. If some instance `j` that kept its counter acknowledged A's
//! write-back before it granted B's first round, then `b > a`: after the
//! write-back `j`'s counter is at least `a`; counters never decrease (`INCR`,
//! `max`); B's `INCR` at `j` comes later, so returns more than `a`, and `b` is
//! at least that. Such a `j` exists whenever A's tenure ended before B's
//! began and the timing assumptions above held: A's write-back quorum and B's
//! granting quorum share an instance (two quorums always do), and there A's
//! key stayed from its grant through its acknowledged write-back (the write-back
//! is refused where the key is gone), so `j` could grant B only after A's key
//! left it — after the write-back. (Granting B *before* A would mean B's key
//! there vanished before A's grant, while B's own validity — counted from before
//! that grant — was still running: the clock assumption rules it out.) So the
//! tokens of successive holders strictly increase.
//!
//! **What breaks it.**
//!
//! - *An instance that loses its counter*: a restart without persistence
//!   forgets `key:fence` with the lock keys. If the only instance shared by the
//!   last write-back quorum and the next granting quorum is one that restarted
//!   empty, the next token can be smaller. The restart quarantine
//!   ([`Builder::restart_quarantine`]) keeps a restarted instance from voting
//!   for a while, which covers every case where a lock is taken during that
//!   time, but not a key left untouched until the quarantine ends. With
//!   persistence (`appendonly yes`, `appendfsync always`) counters survive and
//!   the guarantee holds.
//! - *A holder that paused past its validity* is not prevented from *trying* to
//!   write: that is exactly the case fencing is for. Its token is lower than its
//!   successor's, so the storage must refuse it once the successor has written.
//!   A storage that does not compare tokens gains nothing.
//! - *Broken timing assumptions* (a fast server clock) can let two holders
//!   overlap; their tokens still differ and the later-granted one is larger
//!   wherever they met on an instance after its write-back, so the storage still
//!   orders their writes, but "successive" loses its meaning.
//!
//! A re-take with a caller-chosen token ([`LockRequest::token`]) plus
//! `fenced()` is a new tenure: it gets a new, larger token, and the earlier
//! handle's writes are refused once the new token has been used.
//!
//! # Hand-off to waiters
//!
//! A waiting [`acquire`](QuorumLocker::acquire) retries after randomised delays,
//! so a freed lock sits idle for part of one. With
//! [`Builder::wake_waiters`], a release also publishes on the key's channel
//! (`quorumlock:released:<key>`, inside its script) on every instance it
//! deletes from, and waits subscribe to it: one subscription connection per
//! instance, shared by every wait of the locker and opened only while something
//! waits. A wait retries as soon as a release is heard, and keeps its timed
//! retries as a fallback, so a lost message, a dead subscription connection or
//! a release by a locker without the option costs only the usual delay.
//! Instances given as user-made connections cannot subscribe and fall back
//! silently; [`MemoryInstance`]s deliver the messages in process. The
//! `handoff` bench measures release-to-acquisition latency with and without it.
//!
//! # Cancel safety
//!
//! Dropping an `acquire` or `try_acquire` future at any await point — under
//! `tokio::time::timeout`, in a `select!` — rolls back its attempt in the
//! background: no key with its token is left behind. Dropping a lock releases it,
//! and dropping an `extend` future leaves the lock with its earlier validity — or
//! less, for an extend to a shorter TTL, which may have landed on some
//! instances. One lock's extends run one at a time.
//! [`QuorumLocker::settle`] waits for such background work to finish.
//!
//! # Features
//!
//! - `tls`: `rediss://` URLs.
//! - `cluster`: Redis Cluster members ([`Builder::cluster`]).
//! - `metrics`: metrics through the `metrics` facade (names in the README).
//! - `blocking`: the [`blocking`] API, for code outside an async runtime.
//! - `testing`: the `testing` module: local `redis-server` processes, Redis
//!   Clusters and Sentinel sets with fault controls.
//! - `testcontainers`: the same fixture in Docker where `redis-server` is missing.
//! - `cli`: the `qlock` command-line tool.
#![deny(missing_docs, unreachable_pub)]
#![deny(unsafe_code)]

// The layers, bottom up (tests/layers.rs checks that imports only go down):
// arithmetic and values; the instance seam; each instance's standing; the
// state a locker shares; the monitor and the fan-out over it; the operations;
// the handles; the public front.
mod address;
mod clock;
mod error;
mod lease;
mod metrics;
mod names;
mod quorum;
mod retry;
#[cfg(any(feature = "testing", feature = "cluster"))]
mod slot;
mod token;
mod value;

mod epoch;
mod instance;
mod peer;
mod scripts;
#[cfg(feature = "tls")]
mod tls;

mod standing;

mod background;
mod handoff;
mod shared;

mod fanout;
mod monitor;

mod ops;

mod guard;
mod lock;
mod status;

#[cfg(feature = "blocking")]
pub mod blocking;
mod builder;
mod health;
mod inspect;
mod locker;
mod request;
mod semaphore;

#[cfg(feature = "testing")]
pub mod testing;

/// The README's examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub use builder::{
    Builder, DEFAULT_DRIFT_FACTOR, DEFAULT_INSTANCE_TIMEOUT, DEFAULT_PROBE_EVERY, DEFAULT_TTL,
    DEFAULT_WAIT,
};
pub use error::{Error, InstanceVote, Quarantine, Result, Shortfall, Vote};
pub use guard::LockGuard;
pub use handoff::RELEASE_CHANNEL_PREFIX;
pub use health::{Health, InstanceHealth};
pub use inspect::{Holding, Inspection, KeyOnInstance};
pub use instance::memory::MemoryInstance;
pub use instance::sentinel::SentinelMember;
pub use lease::MAX_TTL;
pub use lock::Lock;
pub use locker::QuorumLocker;
pub use names::EPOCH_KEY;
pub use names::FENCE_SUFFIX;
pub use request::{LockRequest, MAX_METADATA_LEN, MAX_TOKEN_LEN};
pub use retry::RetryPolicy;
pub use semaphore::{Permit, Semaphore, MAX_PERMITS};
pub use status::LockStatus;
pub use value::LockValue;
