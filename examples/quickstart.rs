//! Acquire, contention, release, and `with_lock`, over several Redis instances.
//!
//! ```text
//! cargo run --example quickstart
//! REDIS_URLS=redis://127.0.0.1:7001,redis://127.0.0.1:7002,redis://127.0.0.1:7003 cargo run --example quickstart
//! ```
//!
//! Without `REDIS_URLS` it starts three local redis-server processes of its own
//! (on free ports, stopped when it exits); where redis-server is not installed,
//! Docker containers (with `--features testcontainers`), and failing that
//! in-memory instances. It prints which. See `examples/common/mod.rs`.

mod common;

use std::time::Duration;

use common::Instances;
use quorumlock::{Error, QuorumLocker};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    common::exit(run().await)
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    // Keep the instances (and any local servers) alive until the end of `run`.
    let instances = Instances::choose(3);

    // Two lockers with separate connections, as two processes would have.
    let service_a = instances.builder().build().await?;
    let service_b = instances
        .builder()
        .default_wait(Duration::from_millis(500))
        .build()
        .await?;
    // Fails now, with each instance's answer, rather than at the first lock.
    service_a.prepare().await?;
    println!(
        "\n{} instances, quorum {}",
        service_a.instances(),
        service_a.quorum()
    );

    let ttl = Duration::from_secs(10);
    let lock = service_a.acquire("quickstart:refill-cache", ttl).await?;
    println!(
        "A holds {:?} for another {:?}",
        lock.key(),
        lock.remaining()
    );

    match service_b.acquire("quickstart:refill-cache", ttl).await {
        Err(Error::NotAcquired {
            attempts,
            shortfall,
            ..
        }) => println!("B gave up after {attempts} attempts in 500 ms: {shortfall}"),
        Err(other) => return Err(other.into()),
        Ok(_) => return Err("B took a lock that A holds".into()),
    }

    let released = lock.release().await?;
    // Counted when a quorum has answered; the rest finish in the background.
    println!("A released the lock (confirmed by {released} instance(s) so far)");

    let lock = service_b.acquire("quickstart:refill-cache", ttl).await?;
    println!("B now holds {:?}", lock.key());
    lock.release().await?;

    with_lock(&service_a, &service_b).await?;

    // Releases finish in the background once a quorum answered: wait for them,
    // as a service would before it exits.
    service_a.settle().await;
    service_b.settle().await;
    println!("\ndone: no lock left behind");
    Ok(())
}

/// Work under a lock that a watchdog keeps alive and that is released however
/// the work ends (see examples/with_lock.rs for a job longer than its TTL).
async fn with_lock(
    service_a: &QuorumLocker,
    service_b: &QuorumLocker,
) -> Result<(), Box<dyn std::error::Error>> {
    let ttl = Duration::from_secs(2);
    let rows = service_a
        .with_lock("quickstart:report", ttl, |status| async move {
            // While A works, B's single attempt is refused.
            let refused = service_b
                .try_acquire("quickstart:report", ttl)
                .await
                .is_err();
            tokio::time::sleep(Duration::from_millis(200)).await;
            println!(
                "\nA runs the report under with_lock ({:?} of validity left); B refused: {refused}",
                status.remaining()
            );
            42
        })
        .await?;
    println!("with_lock returned {rows} rows and released the lock");
    let lock = service_b.try_acquire("quickstart:report", ttl).await?;
    lock.release().await?;
    Ok(())
}
