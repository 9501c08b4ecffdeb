//! `qlock health`: every instance's reachability, latency, run_id and clock.

use std::time::Duration;

use quorumlock::InstanceHealth;

use crate::error::{code, print, CliError};
use crate::table;
use crate::target::Target;

pub async fn health(target: &Target) -> Result<u8, CliError> {
    // A few probes over half a second: enough for a first clock-rate estimate
    // (the first, which may include connecting, says little).
    for _ in 0..3 {
        target.locker.health().await;
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    }
    let health = target.locker.health().await;
    let with_rate = health.instances().iter().any(|i| clock_rate(i).is_some());
    let mut header = ["#", "address", "state", "latency", "run_id", "clock offset"]
        .map(String::from)
        .to_vec();
    if with_rate {
        header.push("clock rate".to_string());
    }
    let mut rows = vec![header];
    let mut errors = String::new();
    for instance in health.instances() {
        let dash = || "-".to_string();
        let mut row = vec![instance.index.to_string(), instance.address.to_string()];
        if let Some(error) = &instance.error {
            row.push("down".to_string());
            errors.push_str(&format!(
                "instance {} ({}): {error}\n",
                instance.index, instance.address
            ));
        } else if let Some(left) = instance.quarantined_for {
            // Reachable, but not voting: a restart, flush or failover (or a
            // slot moved) may have lost locks it held.
            row.push("quarantined".to_string());
            errors.push_str(&format!(
                "instance {} ({}): reachable, but quarantined for another {} after a restart, flush, failover or a slot moved (locks it held may be lost); it votes again once they would have expired\n",
                instance.index,
                instance.address,
                humantime::format_duration(Duration::from_millis(
                    u64::try_from(left.as_millis()).unwrap_or(u64::MAX)
                ))
            ));
        } else {
            row.push("ok".to_string());
        }
        row.extend([
            instance.latency.map_or_else(dash, table::millis),
            instance.run_id.as_deref().map_or_else(dash, abbreviate),
            instance
                .clock_offset_ms()
                .map_or_else(dash, |ms| format!("{ms:+.1} ms")),
        ]);
        if with_rate {
            row.push(clock_rate(instance).unwrap_or_else(dash));
        }
        rows.push(row);
    }
    let mut out = format!(
        "{} of {} instance(s) reachable, quorum {}\n",
        health.reachable(),
        health.instances().len(),
        health.quorum()
    );
    out.push_str(&table::render(&rows));
    out.push_str(&errors);
    print(&out)?;
    if !health.has_quorum() {
        return Err(CliError::failure(format!(
            "only {} of {} instance(s) reachable, {} needed",
            health.reachable(),
            health.instances().len(),
            health.quorum()
        )));
    }
    let voting = health
        .instances()
        .iter()
        .filter(|instance| instance.is_reachable() && instance.quarantined_for.is_none())
        .count();
    if voting < health.quorum() {
        return Err(CliError::failure(format!(
            "only {voting} of {} instance(s) can vote now (the others are down or quarantined), {} needed",
            health.instances().len(),
            health.quorum()
        )));
    }
    if let Some((first, second)) = health.same_server() {
        return Err(CliError::failure(format!(
            "instances {first} and {second} are the same server (same run_id): \
             its vote would count twice"
        )));
    }
    Ok(code::OK)
}

/// The estimated clock rate against ours, as parts per million off (a server
/// whose clock runs 1% fast shows +10000 ppm); none until the probes span long
/// enough to tell.
fn clock_rate(instance: &InstanceHealth) -> Option<String> {
    let rate = instance.clock_rate?;
    Some(format!("{:+.0} ppm", (rate - 1.0) * 1e6))
}

/// Enough of a run_id to tell servers apart.
fn abbreviate(run_id: &str) -> String {
    run_id.chars().take(8).collect()
}
