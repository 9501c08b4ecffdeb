//! Acquire, contention and release over several Redis instances.
//!
//! ```text
//! cargo run --example quickstart
//! REDIS_URLS=redis://127.0.0.1:7001,redis://127.0.0.1:7002,redis://127.0.0.1:7003 cargo run --example quickstart
//! ```
//!
//! Without `REDIS_URLS` it starts three local redis-server processes of its own
//! (on free ports, stopped when it exits).

use std::time::Duration;

use quorumlock::testing::RedisCluster;
use quorumlock::{Error, QuorumLocker};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    // Keep the local servers alive until the end of `run`.
    let from_env = std::env::var("REDIS_URLS")
        .ok()
        .filter(|urls| !urls.trim().is_empty());
    let (urls, _local) = match from_env {
        Some(urls) => {
            let urls: Vec<String> = urls.split(',').map(|url| url.trim().to_string()).collect();
            println!("using the instance(s) in REDIS_URLS:");
            (urls, None)
        }
        None => {
            let cluster = RedisCluster::start(3)?;
            println!("REDIS_URLS is not set: started 3 local redis-server processes");
            (cluster.urls(), Some(cluster))
        }
    };
    for url in &urls {
        println!("  {url}");
    }

    // Two lockers with separate connections, as two processes would have.
    let service_a = QuorumLocker::builder().urls(&urls).build().await?;
    let service_b = QuorumLocker::builder()
        .urls(&urls)
        .acquire_timeout(Duration::from_millis(500))
        .build()
        .await?;
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
    service_a.settle().await;
    service_b.settle().await;
    println!("done: no lock left behind");
    Ok(())
}
