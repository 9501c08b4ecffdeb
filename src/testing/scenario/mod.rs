//! Fault scenarios: a real cluster, a fault, several clients contending for a few
//! keys through separate lockers, and the mutual-exclusion [`Checker`] watching.
//! The fault suite's tests, its long soak, and the tolerance benchmark all run
//! these.
//!
//! Here, what a scenario is: its [`Fault`] and its settings; in `run`, the run
//! itself (the holders, the checker, the final sweep); in `faults`, how a run
//! puts its servers through the fault; in `client`, the lock client it drives;
//! in `report`, what it saw.
//!
//! [`Checker`]: crate::testing::Checker

mod client;
mod faults;
mod report;
mod run;

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

pub use self::client::{Failure, ScenarioClient};
pub use self::report::{Report, Summary};
use super::HarnessError;

/// Keys the scenarios use start with this, so the final sweep finds exactly ours.
const PREFIX: &str = "scenario:";

/// What goes wrong during a scenario, on the instances listed.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Fault {
    /// Nothing.
    None,
    /// Killed (SIGKILL) before the clients start, and left dead.
    Kill(Vec<usize>),
    /// Stopped (SIGSTOP) before the clients start, resumed at the end.
    Pause(Vec<usize>),
    /// Every byte to and from them delayed by `latency` plus up to `jitter`, through
    /// a proxy.
    Latency {
        /// The instances behind the slow proxies.
        on: Vec<usize>,
        /// The fixed one-way delay.
        latency: Duration,
        /// The random extra delay, uniform in `[0, jitter]`.
        jitter: Duration,
    },
    /// Latency spikes: every `every`, the proxies hold traffic `spike` long.
    Spikes {
        /// The instances behind the spiking proxies.
        on: Vec<usize>,
        /// How long each spike lasts.
        spike: Duration,
        /// Time from one spike's start to the next.
        every: Duration,
    },
    /// Partitioned away for `cut` every `every`, then healed.
    Partition {
        /// The instances cut off.
        on: Vec<usize>,
        /// How long each partition lasts.
        cut: Duration,
        /// Time from one partition's start to the next.
        every: Duration,
    },
    /// Restarted without its keys every `every`, clients running.
    RestartEmpty {
        /// The instance restarted.
        on: usize,
        /// Time between restarts.
        every: Duration,
    },
    /// Their clocks run at `rate` (through the clock shim).
    ClockRate {
        /// The instances with the odd clock.
        on: Vec<usize>,
        /// Their rate against real time.
        rate: f64,
    },
    /// Their clocks run at `rate` and are stepped back by `step_ms` every
    /// `every`, as NTP corrects a fast clock.
    ClockSteps {
        /// The instances with the odd clock.
        on: Vec<usize>,
        /// Their rate against real time.
        rate: f64,
        /// How far each step goes back.
        step_ms: i64,
        /// Time between steps.
        every: Duration,
    },
}

/// One run: `instances` servers, `clients` lockers with `tasks` tasks each,
/// contending for `keys` keys for `duration` (or until `acquisitions`).
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Shown in reports.
    pub name: String,
    /// How many servers.
    pub instances: usize,
    /// What goes wrong.
    pub fault: Fault,
    /// Separate lockers (separate connections); at least two for contention.
    pub clients: usize,
    /// Tasks per locker.
    pub tasks: usize,
    /// How many keys the tasks contend for.
    pub keys: usize,
    /// The lock TTL.
    pub ttl: Duration,
    /// How long the clients run at most.
    pub duration: Duration,
    /// Stop once this many locks were acquired (counted over all tasks).
    pub acquisitions: usize,
    /// Whether the lockers use the clock-drift defences (rate-aware validity) and
    /// the restart quarantine; off gives plain Redlock, for comparison.
    pub defences: bool,
    /// The lockers' per-instance timeout.
    pub instance_timeout: Duration,
    /// The fraction of tenures held to the end of their validity, where an early
    /// expiry on the servers shows as an overlap; the rest are short.
    pub hold_to_validity: f64,
    /// Every acquisition by a locker built just before it: the start-up window,
    /// over and over. Its acquire latency then counts from the build (the time
    /// to a first lock).
    pub fresh_lockers: bool,
}

impl Scenario {
    /// A scenario with this crate's test defaults: 5 instances, 2 clients × 3
    /// tasks on 2 keys, TTL 300 ms, 3 s or 300 acquisitions, defences on.
    pub fn new(name: impl Into<String>, fault: Fault) -> Self {
        Self {
            name: name.into(),
            instances: 5,
            fault,
            clients: 2,
            tasks: 3,
            keys: 2,
            ttl: Duration::from_millis(300),
            duration: Duration::from_secs(3),
            acquisitions: 300,
            defences: true,
            instance_timeout: Duration::from_millis(50),
            hold_to_validity: 0.5,
            fresh_lockers: false,
        }
    }

    /// The prefix of every key a scenario stores: a [`ScenarioClient`] puts it in
    /// front of the keys it is given, so that the final sweep finds leftovers.
    pub const KEY_PREFIX: &'static str = PREFIX;
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn join_error(err: tokio::task::JoinError) -> HarnessError {
    HarnessError::Io(std::io::Error::other(err.to_string()))
}
