//! Moving locks from an old Redis to a new one without a moment where two
//! clients can hold the same lock: the three phases of docs/MIGRATION.md, in
//! sequence, with what each phase's clients can and cannot do.
//!
//! ```text
//! cargo run --example migration
//! ```
//!
//! Uses the first two URLs of `REDIS_URLS` as old and new if set, else two
//! servers of its own (see examples/common/mod.rs).

mod common;

use std::time::Duration;

use common::Instances;
use quorumlock::{Error, Lock, QuorumLocker};

const OLD: usize = 0;
const NEW: usize = 1;
const KEY: &str = "examples:migration:invoice-run";
const TTL: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> std::process::ExitCode {
    common::exit(run().await)
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut instances = Instances::choose(2);
    if instances.len() < 2 {
        return Err("the migration example needs two instances (old and new) in REDIS_URLS".into());
    }
    // One client (its own locker, as its own process) per phase.
    let phase1 = instances.builder_for(&[OLD]).build().await?;
    // Quorum 2 of 2 is already the default majority for two instances; spelling
    // it out documents that phase 2 needs both servers.
    let phase2 = instances.builder_for(&[OLD, NEW]).quorum(2).build().await?;
    let phase3 = instances.builder_for(&[NEW]).build().await?;
    let old = instances.name(OLD);
    let old = old.as_str();
    println!("old = [{OLD}], new = [{NEW}]");
    // Fails now, with each server's answer, if either is unreachable.
    phase2.prepare().await?;

    println!("\nphase 1: every client locks on [old]; phase-2 clients roll out");
    let held = take("phase-1 client", &phase1, old).await?;
    refused("phase-2 client", &phase2, old).await?; // old says no
    release(held).await?;

    println!("\nphase 2: every client locks on [old, new] with quorum 2");
    let held = take("phase-2 client", &phase2, old).await?;
    refused("phase-1 client not yet redeployed", &phase1, old).await?; // old says no
    refused("phase-3 client already redeployed", &phase3, old).await?; // new says no
    release(held).await?;
    let held = take("phase-1 client", &phase1, old).await?;
    refused("phase-2 client", &phase2, old).await?; // the other way round too
    release(held).await?;

    println!("\nphase 3: every client locks on [new]; old can be retired");
    let held = take("phase-3 client", &phase3, old).await?;
    refused("phase-2 client not yet redeployed", &phase2, old).await?; // new says no
                                                                       // Why phase 2 cannot be skipped: [old] and [new] share no instance.
    match phase1.try_acquire(KEY, TTL).await {
        Ok(second) => {
            println!("  ! a phase-1 client ALSO acquired it: [old] and [new] never see each other");
            release(second).await?;
        }
        Err(err) => return Err(format!("a phase-1 client was refused: {err}").into()),
    }
    release(held).await?;

    println!("\nthe cost of phase 2: it needs both servers");
    if instances.stop(NEW)? {
        match phase2.try_acquire(KEY, TTL).await {
            Err(err) => println!(
                "  phase-2 client, new server down: cannot lock: {}",
                why(&err, old)
            ),
            Ok(_) => return Err("phase 2 took a lock with the new server down".into()),
        }
        // Its grant on old is rolled back in the background, as above.
        phase2.settle().await;
        let held = take("phase-1 client", &phase1, old).await?;
        release(held).await?;
        println!("  (rolling back to phase 1 restores locking while new is down)");
    } else {
        println!("  (skipped: the servers in REDIS_URLS are not this example's to stop)");
    }

    for locker in [&phase1, &phase2, &phase3] {
        locker.settle().await;
    }
    Ok(())
}

async fn take(
    who: &str,
    locker: &QuorumLocker,
    old: &str,
) -> Result<Lock, Box<dyn std::error::Error>> {
    let lock = locker
        .try_acquire(KEY, TTL)
        .await
        .map_err(|err| format!("{who} could not lock: {err}"))?;
    let on: Vec<&str> = locker
        .addresses()
        .map(|address| label(address, old))
        .collect();
    println!("  {who}: acquired the lock on {}", on.join(" + "));
    Ok(lock)
}

async fn refused(
    who: &str,
    locker: &QuorumLocker,
    old: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    match locker.try_acquire(KEY, TTL).await {
        Err(err) => {
            println!("  {who}: refused, as it must be: {}", why(&err, old));
            // A lost attempt is rolled back in the background, and until then its
            // key can refuse the next client: let the next step start clean (a
            // real client would simply retry).
            locker.settle().await;
            Ok(())
        }
        Ok(_) => Err(format!("{who} acquired a lock that is held").into()),
    }
}

async fn release(lock: Lock) -> Result<(), Box<dyn std::error::Error>> {
    lock.release().await?;
    Ok(())
}

/// Each instance's answer, by "old" and "new" rather than by address.
fn why(err: &Error, old: &str) -> String {
    match err {
        Error::NotAcquired {
            shortfall, causes, ..
        } => {
            let votes: Vec<String> = causes
                .iter()
                .map(|cause| format!("{} {}", label(&cause.address, old), cause.vote))
                .collect();
            format!("{} ({shortfall})", votes.join(", "))
        }
        other => other.to_string(),
    }
}

fn label<'a>(address: &str, old: &'a str) -> &'a str {
    if address == old {
        "old"
    } else {
        "new"
    }
}
