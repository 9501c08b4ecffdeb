//! Fault scenarios: a real cluster, a fault, several clients contending for a few
//! keys through separate lockers, and the mutual-exclusion [`Checker`] watching.
//! The fault suite's tests, its long soak, and the tolerance benchmark all run
//! these.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::checker::{Checker, Violation};
use super::cluster::RedisCluster;
use super::proxy::{Direction, FaultProxy};
use super::server::RedisServer;
use super::HarnessError;
use crate::{Builder, Error, QuorumLocker};

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

    /// Runs the scenario on fresh servers and reports what the checker saw. Needs a
    /// multi-threaded Tokio runtime (server control blocks a thread).
    ///
    /// # Errors
    ///
    /// When the servers, proxies or clock shim cannot be started.
    pub async fn run(&self) -> Result<Report, HarnessError> {
        self.run_with::<QuorumLocker>().await
    }

    /// [`run`](Self::run) with another lock client in place of [`QuorumLocker`]: the
    /// same servers, fault, workload and checker, for comparing implementations.
    ///
    /// # Errors
    ///
    /// As [`run`](Self::run).
    pub async fn run_with<C: ScenarioClient>(&self) -> Result<Report, HarnessError> {
        let scenario = self.clone();
        let clock = matches!(
            self.fault,
            Fault::ClockRate { .. } | Fault::ClockSteps { .. }
        );
        let n = self.instances;
        let cluster = tokio::task::spawn_blocking(move || {
            let builder = if clock {
                RedisServer::builder().clock_rate(1.0)
            } else {
                RedisServer::builder()
            };
            RedisCluster::start_with(n, &builder)
        })
        .await
        .map_err(join_error)??;
        let urls = cluster.urls();
        let cluster = Arc::new(Mutex::new(cluster));

        // Proxies only where the fault needs them; elsewhere, straight to the server.
        let proxied: BTreeSet<usize> = match &self.fault {
            Fault::Latency { on, .. } | Fault::Spikes { on, .. } | Fault::Partition { on, .. } => {
                on.iter().copied().collect()
            }
            _ => BTreeSet::new(),
        };
        let mut proxies = Vec::new();
        let mut client_urls = urls.clone();
        for &i in &proxied {
            let addr = lock(&cluster).server(i).addr();
            let proxy = FaultProxy::start(addr).await?;
            client_urls[i] = proxy.url();
            proxies.push(Arc::new(proxy));
        }

        self.apply_static_fault(&cluster, &proxies).await?;
        let mut lockers: Vec<C> = Vec::new();
        for _ in 0..self.clients {
            if let Some(client) = C::connect(self, &client_urls).await {
                lockers.push(client);
            }
        }
        // No warm-up: the clients start at once, as a service's first requests
        // after it starts would.
        let checker = Checker::new();
        let stats = Arc::new(Mutex::new(Stats::default()));
        let started = Instant::now();
        let deadline = started + self.duration;
        let dynamic = self.spawn_dynamic_fault(&cluster, &proxies, deadline);
        let mut tasks = Vec::new();
        for (client, locker) in lockers.iter().enumerate() {
            for task in 0..self.tasks {
                let holder = client * self.tasks + task;
                tasks.push(tokio::spawn(work(
                    scenario.clone(),
                    locker.clone(),
                    client_urls.clone(),
                    holder,
                    checker.clone(),
                    Arc::clone(&stats),
                    deadline,
                )));
            }
        }
        for task in tasks {
            let _ = task.await;
        }
        let elapsed = started.elapsed();
        // The clients may have reached their acquisitions long before the
        // deadline the fault was scheduled to; it has nothing left to hurt.
        if let Some(dynamic) = dynamic {
            dynamic.abort();
            let _ = dynamic.await;
        }

        // Heal everything, let background work finish, then sweep for our keys.
        for proxy in &proxies {
            proxy.heal();
            proxy.set_latency(Direction::Both, Duration::ZERO);
            proxy.set_jitter(Direction::Both, Duration::ZERO);
        }
        self.undo_static_fault(&cluster).await?;
        for locker in &lockers {
            let _ =
                tokio::time::timeout(self.ttl * 4 + Duration::from_secs(3), locker.settle()).await;
        }
        let live: Vec<bool> = {
            let cluster = lock(&cluster);
            let live = |i: usize| cluster.server(i).is_running() && !cluster.server(i).is_paused();
            (0..urls.len()).map(live).collect()
        };
        let keys_left = sweep(&urls, &live).await;
        drop(lockers);
        drop(proxies);
        let cluster = Arc::try_unwrap(cluster).ok();
        if let Some(cluster) = cluster {
            let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
        }

        let stats = std::mem::take(&mut *lock(&stats));
        Ok(Report {
            name: self.name.clone(),
            acquisitions: stats.acquired.len(),
            calls: stats.calls,
            not_acquired: stats.not_acquired,
            errors: stats.errors,
            violations: checker.violations(),
            keys_left,
            longest_call: stats.longest_call,
            acquire_latency: Summary::of(stats.acquired.iter().map(|a| a.latency).collect()),
            validity: Summary::of(stats.acquired.iter().map(|a| a.validity).collect()),
            elapsed,
        })
    }

    async fn apply_static_fault(
        &self,
        cluster: &Arc<Mutex<RedisCluster>>,
        proxies: &[Arc<FaultProxy>],
    ) -> Result<(), HarnessError> {
        match &self.fault {
            Fault::Kill(on) => control(cluster, on.clone(), |c, i| c.kill(i)).await,
            Fault::Pause(on) => control(cluster, on.clone(), |c, i| c.pause(i)).await,
            Fault::ClockRate { on, rate } | Fault::ClockSteps { on, rate, .. } => {
                let rate = *rate;
                control(cluster, on.clone(), move |c, i| c.set_clock_rate(i, rate)).await
            }
            Fault::Latency {
                latency, jitter, ..
            } => {
                for proxy in proxies {
                    proxy.set_latency(Direction::Both, *latency / 2);
                    proxy.set_jitter(Direction::Both, *jitter / 2);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    async fn undo_static_fault(
        &self,
        cluster: &Arc<Mutex<RedisCluster>>,
    ) -> Result<(), HarnessError> {
        match &self.fault {
            Fault::Pause(on) => control(cluster, on.clone(), |c, i| c.resume(i)).await,
            _ => Ok(()),
        }
    }

    /// Starts the fault that acts while the clients run, if any.
    fn spawn_dynamic_fault(
        &self,
        cluster: &Arc<Mutex<RedisCluster>>,
        proxies: &[Arc<FaultProxy>],
        deadline: Instant,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let cluster = Arc::clone(cluster);
        match self.fault.clone() {
            Fault::ClockSteps {
                on, step_ms, every, ..
            } => Some(tokio::spawn(async move {
                let mut offset_ms = 0i64;
                while Instant::now() + every < deadline {
                    tokio::time::sleep(every).await;
                    offset_ms -= step_ms;
                    let _ = control(&cluster, on.clone(), move |c, i| {
                        c.set_clock_offset_ms(i, offset_ms)
                    })
                    .await;
                }
            })),
            Fault::RestartEmpty { on, every } => Some(tokio::spawn(async move {
                while Instant::now() + every < deadline {
                    tokio::time::sleep(every).await;
                    let _ = control(&cluster, vec![on], |c, i| c.restart_empty(i)).await;
                }
            })),
            Fault::Spikes { spike, every, .. }
            | Fault::Partition {
                cut: spike, every, ..
            } => {
                let partition = matches!(self.fault, Fault::Partition { .. });
                let proxies: Vec<Arc<FaultProxy>> = proxies.to_vec();
                Some(tokio::spawn(async move {
                    while Instant::now() + every < deadline {
                        tokio::time::sleep(every.saturating_sub(spike)).await;
                        for proxy in &proxies {
                            if partition {
                                proxy.cut();
                            } else {
                                proxy.set_latency(Direction::Both, spike);
                            }
                        }
                        tokio::time::sleep(spike).await;
                        for proxy in &proxies {
                            proxy.heal();
                            proxy.set_latency(Direction::Both, Duration::ZERO);
                        }
                    }
                }))
            }
            _ => None,
        }
    }
}

/// A lock client that a [`Scenario`] drives in place of [`QuorumLocker`]
/// ([`Scenario::run_with`]), so that another Redlock implementation runs the same
/// workload under the same faults and the same [`Checker`].
pub trait ScenarioClient: Sized + Clone + Send + Sync + 'static {
    /// A held lock.
    type Held: Send + 'static;

    /// One of the scenario's clients, over `urls` (through the fault proxies where
    /// the fault has them); `None` if it cannot be built.
    fn connect(scenario: &Scenario, urls: &[String]) -> impl Future<Output = Option<Self>> + Send;

    /// Takes `key` (stored as [`Scenario::KEY_PREFIX`] then `key`) for `ttl`,
    /// retrying until `wait` has passed. Returns the lock and the end of its
    /// validity on this process's clock.
    fn acquire(
        &self,
        key: &str,
        ttl: Duration,
        wait: Duration,
    ) -> impl Future<Output = Result<(Self::Held, Instant), Failure>> + Send;

    /// Releases a lock (best effort).
    fn release(&self, held: Self::Held) -> impl Future<Output = ()> + Send;

    /// Waits until the client's background work has finished.
    fn settle(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Why a [`ScenarioClient::acquire`] call returned without a lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// Not acquired: contention, or too few instances granted.
    NotAcquired,
    /// Any other error.
    Other,
}

/// The scenarios' own locker: the library's defaults (a fresh locker, no
/// warm-up), and without [`Scenario::defences`] plain Redlock validity and no
/// quarantine.
impl ScenarioClient for QuorumLocker {
    type Held = crate::Lock;

    async fn connect(scenario: &Scenario, urls: &[String]) -> Option<Self> {
        let mut builder: Builder = QuorumLocker::builder()
            .urls(urls.iter().cloned())
            .default_ttl(scenario.ttl)
            .instance_timeout(scenario.instance_timeout)
            .key_prefix(PREFIX);
        if !scenario.defences {
            builder = builder
                .rate_aware_validity(false)
                .restart_quarantine(Duration::ZERO);
        }
        // Settings are this module's own and valid. No `prepare()`: the first
        // acquisitions meet the locker's start-up, as a service's would.
        builder.build().await.ok()
    }

    async fn acquire(
        &self,
        key: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<(Self::Held, Instant), Failure> {
        match self.lock(key).ttl(ttl).wait(wait).acquire().await {
            Ok(held) => {
                let until = held.valid_until();
                Ok((held, until))
            }
            Err(Error::NotAcquired { .. }) => Err(Failure::NotAcquired),
            Err(_) => Err(Failure::Other),
        }
    }

    async fn release(&self, held: Self::Held) {
        let _ = held.release().await;
    }

    async fn settle(&self) {
        QuorumLocker::settle(self).await;
    }
}

/// Runs blocking server control on a blocking thread.
async fn control(
    cluster: &Arc<Mutex<RedisCluster>>,
    on: Vec<usize>,
    action: impl Fn(&mut RedisCluster, usize) -> Result<(), HarnessError> + Send + 'static,
) -> Result<(), HarnessError> {
    let cluster = Arc::clone(cluster);
    tokio::task::spawn_blocking(move || {
        let mut cluster = lock(&cluster);
        on.into_iter().try_for_each(|i| action(&mut cluster, i))
    })
    .await
    .map_err(join_error)?
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn join_error(err: tokio::task::JoinError) -> HarnessError {
    HarnessError::Io(std::io::Error::other(err.to_string()))
}

/// One acquisition, as the task saw it.
#[derive(Debug, Clone, Copy)]
struct Acquired {
    latency: Duration,
    validity: Duration,
}

#[derive(Debug, Default)]
struct Stats {
    acquired: Vec<Acquired>,
    calls: usize,
    not_acquired: usize,
    errors: usize,
    longest_call: Duration,
}

/// One task: take a key, hold it for a while (often to the end of its validity,
/// where overlaps show), release it; record the tenure.
async fn work<C: ScenarioClient>(
    scenario: Scenario,
    locker: C,
    urls: Vec<String>,
    holder: usize,
    checker: Checker,
    stats: Arc<Mutex<Stats>>,
    deadline: Instant,
) {
    // Seeded per holder: a run repeats its workload.
    let mut random = fastrand::Rng::with_seed(holder as u64 + 1);
    let wait = scenario.ttl * 2;
    while Instant::now() < deadline && lock(&stats).acquired.len() < scenario.acquisitions {
        let key = format!("k{}", random.usize(0..scenario.keys.max(1)));
        let called = Instant::now();
        let fresh = if scenario.fresh_lockers {
            C::connect(&scenario, &urls).await
        } else {
            None
        };
        let locker = fresh.as_ref().unwrap_or(&locker);
        let result = locker.acquire(&key, scenario.ttl, wait).await;
        let latency = called.elapsed();
        let lock_result = {
            let mut stats = lock(&stats);
            stats.calls += 1;
            stats.longest_call = stats.longest_call.max(latency);
            match result {
                Ok((held, valid_until)) => {
                    stats.acquired.push(Acquired {
                        latency,
                        validity: valid_until.saturating_duration_since(Instant::now()),
                    });
                    Some((held, valid_until))
                }
                Err(Failure::NotAcquired) => {
                    stats.not_acquired += 1;
                    None
                }
                Err(Failure::Other) => {
                    stats.errors += 1;
                    None
                }
            }
        };
        let Some((held, valid_until)) = lock_result else {
            if let Some(fresh) = &fresh {
                fresh.settle().await;
            }
            continue;
        };
        let remaining = || valid_until.saturating_duration_since(Instant::now());
        let start = Instant::now();
        // Tenures that run to the end of the validity show an early expiry on the
        // servers as an overlap; short ones keep the lock changing hands.
        let hold = if random.f64() < scenario.hold_to_validity {
            remaining()
        } else {
            remaining().mul_f64(random.f64() / 4.0)
        };
        tokio::time::sleep(hold).await;
        let end = Instant::now().min(valid_until);
        checker.record(&key, holder, start, end);
        let called = Instant::now();
        locker.release(held).await;
        {
            let mut stats = lock(&stats);
            stats.longest_call = stats.longest_call.max(called.elapsed());
        }
        // A fresh locker's background work ends before it goes, so that the
        // final sweep sees only what the library leaves.
        if let Some(fresh) = &fresh {
            fresh.settle().await;
        }
    }
}

/// Every key of ours still on a running server (`live[i]`).
async fn sweep(urls: &[String], live: &[bool]) -> usize {
    let mut left = 0;
    for (i, url) in urls.iter().enumerate() {
        if !live[i] {
            continue;
        }
        let Ok(client) = redis::Client::open(url.as_str()) else {
            continue;
        };
        let Ok(mut connection) = client.get_multiplexed_async_connection().await else {
            continue;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{PREFIX}*"))
            .query_async(&mut connection)
            .await
            .unwrap_or_default();
        // The data set's identity stays on purpose.
        left += keys
            .iter()
            .filter(|key| !key.ends_with(crate::EPOCH_KEY))
            .count();
    }
    left
}

/// Percentiles of some durations.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    /// How many.
    pub count: usize,
    /// The smallest.
    pub min: Duration,
    /// The median.
    pub p50: Duration,
    /// The 99th percentile.
    pub p99: Duration,
    /// The largest.
    pub max: Duration,
}

impl Summary {
    fn of(mut values: Vec<Duration>) -> Self {
        values.sort_unstable();
        let at = |q: f64| {
            values
                .get(((values.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or_default()
        };
        Self {
            count: values.len(),
            min: at(0.0),
            p50: at(0.5),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// What a scenario run saw.
#[derive(Debug, Clone)]
pub struct Report {
    /// The scenario's name.
    pub name: String,
    /// Locks acquired.
    pub acquisitions: usize,
    /// `acquire` calls made.
    pub calls: usize,
    /// Calls that ended in `NotAcquired` (contention or too few instances).
    pub not_acquired: usize,
    /// Calls that ended in any other error.
    pub errors: usize,
    /// Overlapping tenures of one key: mutual-exclusion violations.
    pub violations: Vec<Violation>,
    /// Keys of ours still on a running server after the run and its cleanup.
    pub keys_left: usize,
    /// The longest `acquire` or `release` call.
    pub longest_call: Duration,
    /// How long successful `acquire` calls took (waiting for the lock included).
    pub acquire_latency: Summary,
    /// The validity left when `acquire` returned.
    pub validity: Summary,
    /// How long the clients ran.
    pub elapsed: Duration,
}

impl Report {
    /// The header of [`row`](Self::row)'s Markdown table.
    pub fn header() -> &'static str {
        "| scenario | acquisitions | violations | keys left | longest call | acquire p50 / p99 | validity p50 / min |\n|---|---|---|---|---|---|---|"
    }

    /// The report as one Markdown table row.
    pub fn row(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} | {} / {} | {} / {} |",
            self.name,
            self.acquisitions,
            self.violations.len(),
            self.keys_left,
            ms(self.longest_call),
            ms(self.acquire_latency.p50),
            ms(self.acquire_latency.p99),
            ms(self.validity.p50),
            ms(self.validity.min),
        )
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} acquisitions in {} calls ({} not acquired, {} errors), {} violations, {} keys left, longest call {}",
            self.name,
            self.acquisitions,
            self.calls,
            self.not_acquired,
            self.errors,
            self.violations.len(),
            self.keys_left,
            ms(self.longest_call)
        )?;
        for violation in self.violations.iter().take(3) {
            write!(f, "\n  {violation}")?;
        }
        Ok(())
    }
}

fn ms(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1e3)
}
