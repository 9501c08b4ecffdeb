//! The locker's metrics (cargo feature `metrics`) in Prometheus's text format:
//! a few acquisitions, a contended attempt, an extend and a release, then the
//! scrape a Prometheus server would get.
//!
//! ```text
//! cargo run --example metrics --features metrics
//! ```
//!
//! In a service, install the exporter once at start-up (here
//! `metrics-exporter-prometheus`, whose `PrometheusBuilder::install()` also
//! serves `/metrics` over HTTP); the library only records. Instances as in
//! `quickstart` (see `examples/common/mod.rs`).

mod common;

use std::time::Duration;

use common::Instances;
use metrics_exporter_prometheus::PrometheusBuilder;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    common::exit(run().await)
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    let instances = Instances::choose(3);
    let locker = instances.builder().build().await?;

    for i in 0..5 {
        let lock = locker
            .acquire(&format!("job-{i}"), Duration::from_secs(10))
            .await?;
        if i == 0 {
            // Contended: the key is held.
            assert!(locker
                .try_acquire("job-0", Duration::from_secs(10))
                .await
                .is_err());
            lock.extend(Duration::from_secs(10)).await?;
        }
        lock.release().await?;
    }
    locker.settle().await;

    // What a scrape of /metrics returns.
    print!("{}", prometheus.render());
    Ok(())
}
