//! A scenario's run: fresh servers, the holders contending through their
//! lockers under the checker, then the cleanup and the sweep for leftover keys.
//! Apart from the description, which only says what to run.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::report::{Report, Summary};
use super::{join_error, lock, Failure, Fault, Scenario, ScenarioClient, PREFIX};
use crate::testing::checker::Checker;
use crate::testing::cluster::RedisCluster;
use crate::testing::proxy::{Direction, FaultProxy};
use crate::testing::server::RedisServer;
use crate::testing::HarnessError;
use crate::QuorumLocker;

impl Scenario {
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
