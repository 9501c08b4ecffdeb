//! The configuration file each Sentinel of a [`SentinelSet`](super::SentinelSet)
//! starts from. Sentinels rewrite it with what they learn (their id, the replicas
//! and other Sentinels they found, a new primary), so each has a file of its own.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::testing::HarnessError;

/// How long a failover may take before it is abandoned, and twice this, the wait
/// before the same Sentinel tries the same primary again.
const FAILOVER_TIMEOUT_MS: u64 = 5000;

/// Writes a configuration that monitors the primary at `primary` as `service`, with
/// quorum 2 (of 3 Sentinels).
pub(super) fn write(
    path: &Path,
    service: &str,
    primary: SocketAddr,
    down_after: Duration,
) -> Result<(), HarnessError> {
    std::fs::write(path, text(service, primary, down_after))?;
    Ok(())
}

fn text(service: &str, primary: SocketAddr, down_after: Duration) -> String {
    let (ip, port) = (primary.ip(), primary.port());
    let down_after = down_after.as_millis();
    // `resolve-hostnames no`: every address is an IP, none is looked up.
    // `monitor` before the other lines about the same primary, which need it.
    format!(
        "sentinel resolve-hostnames no\n\
         sentinel monitor {service} {ip} {port} 2\n\
         sentinel down-after-milliseconds {service} {down_after}\n\
         sentinel failover-timeout {service} {FAILOVER_TIMEOUT_MS}\n\
         sentinel parallel-syncs {service} 1\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitors_the_primary_with_quorum_two() {
        let text = text(
            "svc",
            "127.0.0.1:4000".parse().unwrap(),
            Duration::from_secs(1),
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "sentinel monitor svc 127.0.0.1 4000 2");
        assert!(lines.contains(&"sentinel down-after-milliseconds svc 1000"));
        assert!(lines.contains(&"sentinel resolve-hostnames no"));
    }
}
