//! Typed errors. Each variant is a distinct decision for the caller: the lock was
//! not acquired, is not held, the instances could not be reached, or the input was
//! invalid. Per-instance causes carry the instance's index and redacted address.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when building a locker or using a lock.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The lock was not acquired: another owner holds it, too few instances
    /// answered, or the attempt took so long that no validity was left. `causes`
    /// holds the vote of every instance in the last attempt: refusals mean
    /// contention, failures and time-outs mean instances are unreachable (see
    /// [`Error::unreachable_instances`]).
    #[error(
        "lock {key:?} not acquired after {attempts} attempt(s): {shortfall}{}",
        Causes(causes)
    )]
    NotAcquired {
        /// The key as the caller gave it (without the locker's prefix).
        key: String,
        /// How many attempts were made.
        attempts: u32,
        /// Why the last attempt was lost.
        shortfall: Shortfall,
        /// Each instance's vote in the last attempt, in instance order.
        causes: Vec<InstanceVote>,
    },

    /// No instance still held the lock with our token: it expired, or another owner
    /// took it over after expiry.
    #[error("lock {key:?} is not held by this owner on any instance")]
    NotHeld {
        /// The key as the caller gave it.
        key: String,
    },

    /// An extend did not reach a quorum with validity left. The lock is now lost:
    /// the keys keep their earlier TTL on the instances that did extend and
    /// expire by themselves; the extend deleted nothing.
    #[error("lock {key:?} not extended: {shortfall}{}", Causes(causes))]
    NotExtended {
        /// The key as the caller gave it.
        key: String,
        /// Why the extend fell short.
        shortfall: Shortfall,
        /// Each instance's answer, in instance order.
        causes: Vec<InstanceVote>,
    },

    /// The lock is no longer valid: its validity ran out, an extend failed, or it
    /// was released. From [`QuorumLocker::with_lock`](crate::QuorumLocker::with_lock)
    /// it means the work was cancelled (dropped at its next await point) because the
    /// lock was lost.
    #[error("lock {key:?} was lost: {}", if source.is_some() { "an extend failed" } else { "its validity ran out" })]
    LockLost {
        /// The key as the caller gave it.
        key: String,
        /// The failed extend that lost it, when that was the reason (else the
        /// validity ran out first).
        #[source]
        source: Option<Box<Error>>,
    },

    /// Too few instances answered to know the outcome: the operation may or may not
    /// have taken effect on the others.
    #[error(
        "{operation}{}: too few instances answered{}",
        Subject(key),
        Causes(causes)
    )]
    Unavailable {
        /// What was being done (`"release"`, `"prepare"`).
        operation: &'static str,
        /// The key as the caller gave it (empty for locker-wide operations).
        key: String,
        /// Each instance's result, in instance order.
        causes: Vec<InstanceVote>,
    },

    /// The TTL is zero, shorter than the drift allowance, or too large for `PX`.
    #[error("invalid TTL {ttl:?}: {reason}")]
    InvalidTtl {
        /// The TTL given.
        ttl: Duration,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// The lock key is empty.
    #[error("the lock key is empty")]
    EmptyKey,

    /// The lock key, after the key prefix, ends in the name under which lockers
    /// keep each server's identity ([`EPOCH_KEY`](crate::EPOCH_KEY)) or a
    /// fenced lock's counter ([`FENCE_SUFFIX`](crate::FENCE_SUFFIX)).
    #[error("the lock key {key:?} is reserved by quorumlock")]
    ReservedKey {
        /// The key given.
        key: String,
    },

    /// A locker with a Redis Cluster member was given a key that holds a `}`
    /// but no hash tag: the keys a lock's scripts touch (its fencing counter)
    /// could not share its slot. A key with a tag (`{job}`, `locks:{job}:run`)
    /// or without braces works.
    #[error("the lock key {key:?} holds a `}}` but no hash tag, so its fencing counter cannot share its Redis Cluster slot; give it a tag such as {{name}}")]
    KeyNotForCluster {
        /// The key given.
        key: String,
    },

    /// The builder was given no instances.
    #[error("no Redis instances were given")]
    NoInstances,

    /// Two instances are the same server; its vote would count twice.
    #[error("instance {second} ({address}) is the same server as instance {first}")]
    DuplicateInstance {
        /// Index of the first occurrence.
        first: usize,
        /// Index of the duplicate.
        second: usize,
        /// The shared address, password redacted.
        address: String,
    },

    /// The quorum is larger than the number of instances, or not more than half of
    /// them (two owners could then win at once).
    #[error("quorum {quorum} is out of range for {instances} instance(s): it must be more than {} and at most {instances}", instances / 2)]
    QuorumOutOfRange {
        /// The quorum asked for.
        quorum: usize,
        /// The number of instances.
        instances: usize,
    },

    /// A Redis URL could not be parsed or uses an unsupported scheme.
    #[error("instance {index}: invalid Redis URL {url}: {reason}")]
    InvalidUrl {
        /// Index of the instance.
        index: usize,
        /// The URL, password redacted.
        url: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A setting is out of its range: a builder setting, a lock option (token,
    /// metadata, auto-extend interval) or a memory instance's clock rate.
    #[error("invalid {setting}: {reason}")]
    InvalidConfig {
        /// The setting's method name.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// The locker was built or used outside a Tokio runtime.
    #[error("quorumlock needs a Tokio runtime: build and use the locker inside one")]
    NoRuntime,

    /// A `quorumlock::blocking` call (feature `blocking`) was made from async
    /// code, where blocking the thread would stall its runtime: use the async
    /// API there.
    #[error("quorumlock::blocking was called inside an async runtime: use the async API there")]
    InsideRuntime,

    /// The `quorumlock::blocking` locker's own runtime could not start.
    #[error("quorumlock::blocking could not start its runtime: {0}")]
    Runtime(String),

    /// The operating system's random number generator failed, so no safe token
    /// could be made.
    #[error("the operating system's random number generator failed: {0}")]
    Entropy(String),
}

/// Why an attempt was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Shortfall {
    /// Fewer than `needed` instances granted the key.
    TooFewVotes {
        /// Instances that granted.
        granted: usize,
        /// The quorum.
        needed: usize,
    },
    /// A quorum granted, but the attempt took longer than the TTL minus the drift
    /// allowance, so no validity was left.
    ValidityExhausted {
        /// How long the attempt took.
        elapsed: Duration,
    },
    /// A fenced attempt won its first round, but fewer than `needed` of the
    /// granting instances acknowledged the fencing token's write-back (or no
    /// validity was left after it), so no token was handed out and the attempt was
    /// rolled back. The causes are the write-back's answers.
    FenceNotWritten {
        /// Instances that acknowledged the write-back.
        acknowledged: usize,
        /// The quorum.
        needed: usize,
    },
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooFewVotes { granted, needed } => {
                write!(f, "{granted} instance(s) granted, {needed} needed")
            }
            Self::ValidityExhausted { elapsed } => {
                write!(
                    f,
                    "a quorum granted but the attempt took {elapsed:?}, leaving no validity"
                )
            }
            Self::FenceNotWritten {
                acknowledged,
                needed,
            } => write!(
                f,
                "a quorum granted but {acknowledged} instance(s) acknowledged the fencing token, {needed} needed, with validity left"
            ),
        }
    }
}

/// One instance's answer in an attempt, a release or a preparation.
#[derive(Debug, Clone)]
pub struct InstanceVote {
    /// The instance's position in the order given to the builder.
    pub index: usize,
    /// Its address (password redacted) or the name given with its connection.
    pub address: Arc<str>,
    /// What it answered.
    pub vote: Vote,
}

impl fmt::Display for InstanceVote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "instance {} ({}): {}",
            self.index, self.address, self.vote
        )
    }
}

/// What an instance answered.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Vote {
    /// It did what was asked (set, deleted or loaded).
    Granted,
    /// It answered no: the key is held by another owner, or not held by us.
    Refused,
    /// It answered with an error, or the connection failed.
    Failed(redis::RedisError),
    /// It did not answer within the per-instance timeout.
    TimedOut(Duration),
    /// It had not answered when the outcome was already decided.
    Unanswered,
    /// It was not asked: the locker does not trust it now.
    Quarantined(Quarantine),
}

/// Why an instance was not asked to grant a lock.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Quarantine {
    /// It restarted (its `run_id` changed) or lost its data set (the epoch key,
    /// see [`EPOCH_KEY`](crate::EPOCH_KEY), changed: a flush or a failover) and
    /// may have forgotten the locks it held; it votes again once every lock it
    /// could have held has expired. See
    /// [`Builder::restart_quarantine`](crate::Builder::restart_quarantine).
    Restarted {
        /// How long until it votes again; zero when only the reads of enough
        /// other instances are missing (see the crate docs, *Restarts*).
        remaining: Duration,
    },
    /// Its connection failed and no probe has reached it since: it may have
    /// restarted.
    Unverified,
    /// Its clock runs faster than the drift factor allows, so it would expire the
    /// key early. See [`Builder::quarantine_fast_clocks`](crate::Builder::quarantine_fast_clocks).
    ClockDrift {
        /// Its clock's rate against ours (1.0 is exact).
        rate: f64,
    },
    /// No probe has said yet which server it is: a new locker's first probe is
    /// still out, or it has never answered one.
    Unidentified,
    /// Its clock has not been measured yet (a new locker, a restart, a clock
    /// stepped back): its keys could expire at any time for all the locker
    /// knows. A new locker's first attempt waits for the measurement (about
    /// 85 ms).
    ClockUnmeasured,
    /// It is the same server (same `run_id`), or holds the same data (a replica),
    /// as an earlier instance: its vote would count twice.
    Duplicate {
        /// The index of the earlier instance.
        of: usize,
    },
    /// It has this many requests waiting for an answer: it is stalled, and new
    /// locks do not pile more work onto it until it answers.
    Backlog {
        /// The number of requests in flight.
        in_flight: usize,
    },
}

impl fmt::Display for Quarantine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Restarted { remaining } if remaining.is_zero() => f.write_str(
                "may have lost its keys (a restart, flush, failover or a slot moved); quarantined until enough other instances have said how long their locks last",
            ),
            Self::Restarted { remaining } => write!(
                f,
                "may have lost its keys (a restart, flush, failover or a slot moved); quarantined for another {:.1?} in case it forgot a lock",
                remaining
            ),
            Self::Unverified => {
                f.write_str("its connection failed and it has not been reached since")
            }
            Self::ClockDrift { rate } => write!(
                f,
                "its clock runs {rate:.3} times as fast as ours, beyond the drift allowance"
            ),
            Self::Unidentified => f.write_str("no probe has identified the server yet"),
            Self::ClockUnmeasured => f.write_str("its clock rate is not measured yet"),
            Self::Duplicate { of } => write!(
                f,
                "it is the same server or data set as instance {of}, which votes for both"
            ),
            Self::Backlog { in_flight } => write!(
                f,
                "{in_flight} requests to it are still waiting for an answer"
            ),
        }
    }
}

impl fmt::Display for Vote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Granted => f.write_str("granted"),
            Self::Refused => f.write_str("refused"),
            Self::Failed(err) => write!(f, "failed: {err}"),
            Self::TimedOut(after) => write!(f, "timed out after {after:?}"),
            Self::Unanswered => f.write_str("no reply before the outcome was decided"),
            Self::Quarantined(why) => write!(f, "not asked: {why}"),
        }
    }
}

/// Formats a lock key as ` of lock "key"`, and a locker-wide operation's empty
/// key as nothing.
struct Subject<'a>(&'a str);

impl fmt::Display for Subject<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, " of lock {:?}", self.0)
        }
    }
}

/// Formats causes as `; instance 0 (..): ..; instance 1 (..): ..`.
struct Causes<'a>(&'a [InstanceVote]);

impl fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for cause in self.0 {
            write!(f, "; {cause}")?;
        }
        Ok(())
    }
}

impl Error {
    /// How many instances failed, timed out or were quarantined (rather than
    /// refused) in the causes: zero means a `NotAcquired` was plain contention.
    pub fn unreachable_instances(&self) -> usize {
        self.causes()
            .iter()
            .filter(|cause| {
                matches!(
                    cause.vote,
                    Vote::Failed(_) | Vote::TimedOut(_) | Vote::Quarantined(_)
                )
            })
            .count()
    }

    /// Each instance's vote, where the error carries them.
    pub fn causes(&self) -> &[InstanceVote] {
        match self {
            Self::NotAcquired { causes, .. }
            | Self::NotExtended { causes, .. }
            | Self::Unavailable { causes, .. } => causes,
            _ => &[],
        }
    }
}
