//! A job that must run once per interval although every replica of a service
//! schedules it: four "processes" (tasks with lockers of their own) wake at
//! slightly different moments in each interval, and only the first runs it.
//!
//! ```text
//! cargo run --example cron_once
//! ```
//!
//! Uses `REDIS_URLS` if set, else three servers of its own (see
//! examples/common/mod.rs).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::Instances;
use quorumlock::{Error, QuorumLocker};
use tokio::task::JoinSet;

const INTERVAL: Duration = Duration::from_secs(1);
const INTERVALS: u64 = 3;
const PROCESSES: u64 = 4;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    common::exit(run().await)
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let instances = Instances::choose(3);
    // Every process schedules the same slots of wall-clock time, so they agree
    // on which interval they are in without talking to each other.
    let first = slot_of(SystemTime::now()) + 1;
    println!("\n{PROCESSES} processes, one report per {INTERVAL:?}, for {INTERVALS} intervals");

    // Unreachable instances fail here, once, rather than in every process.
    instances.builder().build().await?.prepare().await?;

    let mut processes = JoinSet::new();
    for process in 0..PROCESSES {
        let locker = instances.builder().build().await?;
        processes.spawn(scheduler(process, locker, first));
    }
    let mut runs: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    while let Some(done) = processes.join_next().await {
        for slot in done?? {
            runs.entry(slot.0).or_default().push(slot.1);
        }
    }

    for slot in first..first + INTERVALS {
        match runs.get(&slot).map(Vec::as_slice) {
            Some([process]) => println!(
                "interval {}: run once, by process {process}",
                slot - first + 1
            ),
            Some(many) => {
                let n = slot - first + 1;
                return Err(format!("interval {n} ran {} times: {many:?}", many.len()).into());
            }
            None => return Err(format!("interval {} never ran", slot - first + 1).into()),
        }
    }
    Ok(())
}

/// One process's scheduler: wakes in each slot and tries to claim it. Returns
/// the `(slot, process)` pairs of the runs it made.
async fn scheduler(
    process: u64,
    locker: QuorumLocker,
    first: u64,
) -> quorumlock::Result<Vec<(u64, u64)>> {
    let mut ran = Vec::new();
    for slot in first..first + INTERVALS {
        // Replicas never wake at exactly the same moment; make that visible.
        let jitter = Duration::from_millis((process + slot) % PROCESSES * 45);
        sleep_until_wall(slot_start(slot) + jitter).await;

        // A key per slot: this slot's claim cannot be mistaken for the next one's.
        let key = format!("examples:cron:nightly-report:{slot}");
        // One attempt, no waiting: a loser must not wait for the key to go and
        // then run the job a second time in the same slot. (Nor `with_lock`: it
        // releases the lock as soon as the job is done.)
        //
        // TTL = the interval, and no release after the job: the key must stay
        // until the slot is over, so that replicas that wake later in the slot
        // find it taken. Releasing after a 50 ms job would let the next replica
        // to wake run it again. (It also expires by itself, so a crashed winner
        // blocks nothing beyond its slot.)
        match locker.try_acquire(&key, INTERVAL).await {
            Ok(lock) => {
                println!(
                    "  interval {}: process {process} woke at +{jitter:?}, claimed it, runs the report",
                    slot - first + 1
                );
                tokio::time::sleep(Duration::from_millis(50)).await; // the job
                ran.push((slot, process));
                // Dropping a lock releases it; this one must outlive the job.
                lock.leave_to_expire();
            }
            // Too few instances answered: perhaps nobody can run it this time,
            // which an operator should hear about.
            Err(err @ Error::NotAcquired { .. }) if err.unreachable_instances() > 0 => {
                eprintln!("  process {process}: could not reach the instances: {err}");
            }
            Err(Error::NotAcquired { .. }) => {
                println!(
                    "  interval {}: process {process} woke at +{jitter:?}, already claimed: skips",
                    slot - first + 1
                );
            }
            Err(other) => return Err(other),
        }
    }
    locker.settle().await;
    Ok(ran)
}

fn slot_of(time: SystemTime) -> u64 {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    since_epoch.as_millis() as u64 / INTERVAL.as_millis() as u64
}

fn slot_start(slot: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(slot * INTERVAL.as_millis() as u64)
}

async fn sleep_until_wall(at: SystemTime) {
    let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(wait).await;
}
