//! `with_lock`: a job that runs longer than its lock's TTL, kept alive by the
//! watchdog; then what losing the lock looks like.
//!
//! ```text
//! cargo run --example with_lock
//! ```
//!
//! Uses `REDIS_URLS` if set, else three servers of its own (see
//! examples/common/mod.rs). Part 2 deletes its own lock key on a majority of the
//! instances, as an operator's `DEL` or a server that lost its data would.

mod common;

use std::time::Duration;

use common::Instances;
use quorumlock::{Error, QuorumLocker};
use tokio::time::Instant;

/// Short on purpose: the job below takes more than twice as long.
const TTL: Duration = Duration::from_secs(1);

#[tokio::main]
async fn main() -> std::process::ExitCode {
    common::exit(run().await)
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let instances = Instances::choose(3);
    let worker = instances.builder().build().await?;
    let other = instances.builder().build().await?;
    worker.prepare().await?;

    outlive_the_ttl(&worker, &other).await?;
    lose_the_lock(&instances, &worker, &other).await?;

    worker.settle().await;
    other.settle().await;
    Ok(())
}

/// 2.5 s of work under a 1 s lock: the watchdog extends it every third of the
/// TTL, so the validity never runs out and nobody else gets in.
async fn outlive_the_ttl(
    worker: &QuorumLocker,
    other: &QuorumLocker,
) -> Result<(), Box<dyn std::error::Error>> {
    println!("\n1. a 2.5 s job under a lock with a {TTL:?} TTL");
    let key = "examples:with_lock:long-job";
    let started = Instant::now();
    let steps = worker
        .with_lock(key, TTL, |status| async move {
            for step in 1..=5 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                // The other process's single attempt shows the lock is still held.
                let refused = other.try_acquire(key, TTL).await.is_err();
                println!(
                    "   {:>4} ms: step {step}/5, {:>4} ms of validity left, another client refused: {refused}",
                    started.elapsed().as_millis(),
                    status.remaining().as_millis(),
                );
            }
            5
        })
        .await?;
    println!(
        "   done after {:?}: {steps} steps, longer than the TTL; with_lock released the lock",
        started.elapsed()
    );
    Ok(())
}

/// Someone deletes the key on a majority: the watchdog's next extend reaches
/// too few instances, the lock is lost, and the work is cancelled at its next
/// await instead of running on unprotected.
async fn lose_the_lock(
    instances: &Instances,
    worker: &QuorumLocker,
    other: &QuorumLocker,
) -> Result<(), Box<dyn std::error::Error>> {
    let key = "examples:with_lock:lost-job";
    let majority = instances.len() / 2 + 1;
    println!(
        "\n2. the key is deleted on {majority} of {} instances while the job runs",
        instances.len()
    );
    let started = Instant::now();
    let sabotage = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for i in 0..majority {
            instances.delete(i, key).await?;
        }
        let which: Vec<String> = (0..majority).map(|i| i.to_string()).collect();
        println!(
            "   {:>4} ms: deleted {key:?} on instances {}",
            started.elapsed().as_millis(),
            which.join(", ")
        );
        Ok::<_, redis::RedisError>(())
    };
    let job = worker.with_lock(key, TTL, |_status| async move {
        for step in 1.. {
            tokio::time::sleep(Duration::from_millis(200)).await;
            println!(
                "   {:>4} ms: working, step {step}",
                started.elapsed().as_millis()
            );
        }
    });
    let (outcome, deleted) = tokio::join!(job, sabotage);
    deleted?;
    match outcome {
        Err(Error::LockLost { source, .. }) => {
            println!(
                "   {:>4} ms: with_lock returned LockLost; the work was cancelled",
                started.elapsed().as_millis()
            );
            if let Some(extend) = source {
                println!("   why: {extend}");
            }
        }
        Err(other) => return Err(other.into()),
        Ok(()) => return Err("the work finished although its lock was deleted".into()),
    }
    // The lock is free again for whoever comes next.
    let lock = other.try_acquire(key, TTL).await?;
    println!("   another client now takes {key:?} at once");
    lock.release().await?;
    Ok(())
}
