//! `qlock bench`: acquire+release loops for a few seconds, then latencies.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use quorumlock::{Error, QuorumLocker};
use tokio::time::Instant;

use crate::args::BenchArgs;
use crate::error::{code, one_line, print, CliError};
use crate::table;
use crate::target::Target;

/// After an error, so that a dead instance that refuses connections at once
/// does not turn a task into a busy loop.
const ERROR_PAUSE: Duration = Duration::from_millis(10);

/// One task's counts and latencies.
#[derive(Default)]
struct Stats {
    attempts: u64,
    acquired: u64,
    not_acquired: u64,
    errors: u64,
    acquire: Vec<Duration>,
    release: Vec<Duration>,
    cycle: Vec<Duration>,
    first_error: Option<String>,
}

impl Stats {
    fn error(&mut self, err: &Error) {
        self.errors += 1;
        self.first_error
            .get_or_insert_with(|| one_line(&err.to_string()));
    }

    fn merge(&mut self, other: Stats) {
        self.attempts += other.attempts;
        self.acquired += other.acquired;
        self.not_acquired += other.not_acquired;
        self.errors += other.errors;
        self.acquire.extend(other.acquire);
        self.release.extend(other.release);
        self.cycle.extend(other.cycle);
        self.first_error = self.first_error.take().or(other.first_error);
    }
}

/// Live counts for the progress bar.
#[derive(Default)]
struct Progress {
    cycles: AtomicU64,
    errors: AtomicU64,
}

pub async fn bench(target: &Target, args: &BenchArgs) -> Result<u8, CliError> {
    target.prepare().await?;
    let healthy = phase(target, &target.locker, args, "as they are").await?;
    print(&healthy.report)?;
    let Some(latency) = args.latency else {
        return healthy.verdict();
    };
    // The first phase's last releases may still be finishing on its keys.
    target.locker.settle().await;
    let slow = args.slow.min(target.urls.len());
    let (locker, _proxies) = target.behind_proxies(slow, latency).await?;
    let title = format!(
        "with {} added to every round trip to {slow} of {} instance(s)",
        humantime::format_duration(latency),
        target.urls.len()
    );
    let slowed = phase(target, &locker, args, &title).await?;
    print(&format!("\n{}", slowed.report))?;
    let ratio = |of: &Stats, to: &Stats| {
        let (a, b) = (median(&of.cycle), median(&to.cycle));
        match (a, b) {
            (Some(a), Some(b)) if !b.is_zero() => {
                format!("{:.2}×", a.as_secs_f64() / b.as_secs_f64())
            }
            _ => "-".to_string(),
        }
    };
    print(&format!(
        "\nslowed / healthy: acquire+release p50 {}, success {:.1}% vs {:.1}%\n",
        ratio(&slowed.total, &healthy.total),
        slowed.success() * 100.0,
        healthy.success() * 100.0
    ))?;
    healthy.verdict()?;
    Ok(code::OK)
}

/// One timed run's totals and its printed report.
struct Phase {
    total: Stats,
    report: String,
}

impl Phase {
    fn success(&self) -> f64 {
        if self.total.attempts == 0 {
            return 0.0;
        }
        self.total.acquired as f64 / self.total.attempts as f64
    }

    fn verdict(&self) -> Result<u8, CliError> {
        if self.total.acquired == 0 {
            return Err(CliError::failure(format!(
                "no lock was acquired{}",
                self.total
                    .first_error
                    .as_ref()
                    .map(|err| format!(": {err}"))
                    .unwrap_or_default()
            )));
        }
        Ok(code::OK)
    }
}

fn median(sorted: &[Duration]) -> Option<Duration> {
    percentile(sorted, 0.5)
}

/// Runs the cycles for `--seconds` against `locker`, with a progress bar.
async fn phase(
    target: &Target,
    locker: &QuorumLocker,
    args: &BenchArgs,
    title: &str,
) -> Result<Phase, CliError> {
    let length = Duration::from_secs(args.seconds);
    let started = Instant::now();
    let deadline = started + length;
    let progress = Arc::new(Progress::default());
    let tasks: Vec<_> = (0..args.tasks)
        .map(|task| {
            let key = format!("{}:{}:{task}", args.key, std::process::id());
            tokio::spawn(cycles(
                locker.clone(),
                key,
                args.ttl,
                deadline,
                Arc::clone(&progress),
            ))
        })
        .collect();

    let bar = ProgressBar::new(length.as_millis().try_into().unwrap_or(u64::MAX));
    if let Ok(style) = ProgressStyle::with_template("{spinner} [{bar:40}] {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    while Instant::now() < deadline {
        let elapsed = started.elapsed();
        bar.set_position(elapsed.as_millis().try_into().unwrap_or(u64::MAX));
        bar.set_message(format!(
            "{:.1}s/{}s  {} cycles  {} errors",
            elapsed.as_secs_f64(),
            args.seconds,
            progress.cycles.load(Ordering::Relaxed),
            progress.errors.load(Ordering::Relaxed)
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.set_message("finishing the last cycles");
    let mut total = Stats::default();
    for task in tasks {
        match task.await {
            Ok(stats) => total.merge(stats),
            Err(err) => {
                bar.finish_and_clear();
                return Err(CliError::failure(format!("a bench task failed: {err}")));
            }
        }
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();

    let report = format!(
        "instances {title}: {}",
        report(target, args, &mut total, elapsed)
    );
    Ok(Phase { total, report })
}

/// One task: take and release its own key until the deadline.
async fn cycles(
    locker: QuorumLocker,
    key: String,
    ttl: Duration,
    deadline: Instant,
    progress: Arc<Progress>,
) -> Stats {
    let mut stats = Stats::default();
    while Instant::now() < deadline {
        stats.attempts += 1;
        let started = Instant::now();
        match locker.try_acquire(&key, ttl).await {
            Ok(lock) => {
                let acquired = Instant::now();
                stats.acquired += 1;
                stats.acquire.push(acquired - started);
                match lock.release().await {
                    Ok(_) => {
                        let released = Instant::now();
                        stats.release.push(released - acquired);
                        stats.cycle.push(released - started);
                        progress.cycles.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) => {
                        stats.error(&err);
                        progress.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            // Refused everywhere it answered: someone else has this key.
            Err(err @ Error::NotAcquired { .. }) if err.unreachable_instances() == 0 => {
                stats.not_acquired += 1;
            }
            Err(err) => {
                stats.error(&err);
                progress.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
    stats
}

fn report(target: &Target, args: &BenchArgs, total: &mut Stats, elapsed: Duration) -> String {
    let mut out = format!(
        "{} task(s) for {:.1}s on {} instance(s), quorum {}, ttl {}\n\n",
        args.tasks,
        elapsed.as_secs_f64(),
        target.locker.instances(),
        target.locker.quorum(),
        humantime::format_duration(args.ttl)
    );
    let rate = total.cycle.len() as f64 / elapsed.as_secs_f64();
    out.push_str(&table::render(&[
        ["attempts", "acquired", "not acquired", "errors", "cycles/s"]
            .map(String::from)
            .to_vec(),
        vec![
            total.attempts.to_string(),
            total.acquired.to_string(),
            total.not_acquired.to_string(),
            total.errors.to_string(),
            format!("{rate:.1}"),
        ],
    ]));
    out.push('\n');
    let mut rows = vec![["latency", "p50", "p90", "p99", "max"]
        .map(String::from)
        .to_vec()];
    for (name, samples) in [
        ("acquire", &mut total.acquire),
        ("release", &mut total.release),
        ("acquire+release", &mut total.cycle),
    ] {
        samples.sort_unstable();
        let mut row = vec![name.to_string()];
        row.extend(
            [0.50, 0.90, 0.99, 1.0]
                .map(|q| percentile(samples, q).map_or_else(|| "-".to_string(), table::millis)),
        );
        rows.push(row);
    }
    out.push_str(&table::render(&rows));
    if let Some(err) = &total.first_error {
        out.push_str(&format!("\nfirst error: {err}\n"));
    }
    out
}

/// The nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}
