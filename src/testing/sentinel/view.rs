//! What the Sentinels of a [`SentinelSet`](super::SentinelSet) report
//! (`SENTINEL MASTERS`, `SENTINEL REPLICAS`, `SENTINEL get-master-addr-by-name`), and
//! the check that they agree and are ready for a failover.
//!
//! Redis 7.0 knows these commands by their old names only (`MASTERS`, not
//! `PRIMARIES`); `REPLICAS` it has had since 5.0.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use crate::testing::probe::{query, unexpected};
use crate::testing::server::RedisServer;
use crate::testing::HarnessError;

/// A `SENTINEL MASTERS` or `SENTINEL REPLICAS` entry: its field names and values.
type Fields = HashMap<String, String>;

/// Where `sentinel` says the primary of `service` is.
pub(super) fn primary_addr(
    sentinel: &RedisServer,
    service: &str,
) -> Result<SocketAddr, HarnessError> {
    let args = ["SENTINEL", "get-master-addr-by-name", service];
    let reply: Option<(String, u16)> = query(sentinel.addr(), &args)?;
    let unknown = |detail: String| unexpected(sentinel.addr(), &args, detail);
    let (ip, port) = reply.ok_or_else(|| unknown(format!("it does not monitor {service}")))?;
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| unknown(format!("a primary at {ip:?}, not an IP")))?;
    Ok(SocketAddr::new(ip, port))
}

/// The primary every running Sentinel reports, if they all report the same one.
pub(super) fn agreed_primary(
    sentinels: &[RedisServer],
    service: &str,
) -> Result<SocketAddr, String> {
    let mut agreed: Option<(usize, SocketAddr)> = None;
    for (i, sentinel) in sentinels.iter().enumerate().filter(|(_, s)| s.is_running()) {
        let addr = primary_addr(sentinel, service).map_err(|e| format!("Sentinel {i}: {e}"))?;
        match agreed {
            None => agreed = Some((i, addr)),
            Some((first, theirs)) if theirs != addr => {
                return Err(format!(
                    "Sentinel {i} reports the primary at {addr}, Sentinel {first} at {theirs}"
                ))
            }
            Some(_) => {}
        }
    }
    agreed
        .map(|(_, addr)| addr)
        .ok_or_else(|| "no Sentinel is running".to_owned())
}

/// The addresses of the primary and of the replica when every running Sentinel
/// reports the same primary, one of `servers`, flagged `master` and nothing else (not
/// down, no failover under way), knows every other Sentinel, and lists the other
/// server as a replica flagged `slave` alone (connected, not down). Otherwise what the
/// first Sentinel found wanting is missing.
///
/// The replica's link to the primary is not asked of the Sentinels: they read it
/// from its `INFO` only every 10 s, so the replica is asked itself.
pub(super) fn check_ready(
    sentinels: &[RedisServer],
    service: &str,
    servers: [SocketAddr; 2],
) -> Result<(SocketAddr, SocketAddr), String> {
    let primary = agreed_primary(sentinels, service)?;
    let replica = match servers {
        [a, b] if a == primary => b,
        [a, b] if b == primary => a,
        _ => {
            return Err(format!(
                "the Sentinels report a primary at {primary}, neither of the set's servers"
            ))
        }
    };
    for (i, sentinel) in sentinels.iter().enumerate().filter(|(_, s)| s.is_running()) {
        let who = format!("Sentinel {i} ({})", sentinel.addr());
        let masters: Vec<Fields> =
            query(sentinel.addr(), &["SENTINEL", "MASTERS"]).map_err(|e| format!("{who}: {e}"))?;
        let master = masters
            .iter()
            .find(|fields| field(fields, "name") == service)
            .ok_or_else(|| format!("{who} does not monitor {service}"))?;
        if field(master, "flags") != "master" {
            return Err(format!(
                "{who} flags the primary {}",
                field(master, "flags")
            ));
        }
        let others = field(master, "num-other-sentinels");
        if others != (sentinels.len() - 1).to_string() {
            return Err(format!(
                "{who} knows {others} of the {} other Sentinels",
                sentinels.len() - 1
            ));
        }
        let replicas: Vec<Fields> = query(sentinel.addr(), &["SENTINEL", "REPLICAS", service])
            .map_err(|e| format!("{who}: {e}"))?;
        let listed = replicas.iter().find(|r| {
            field(r, "ip") == replica.ip().to_string()
                && field(r, "port") == replica.port().to_string()
        });
        match listed.map(|r| field(r, "flags")) {
            Some("slave") => {}
            Some(flags) => return Err(format!("{who} flags the replica {replica} {flags}")),
            None => return Err(format!("{who} does not know the replica {replica} yet")),
        }
    }
    Ok((primary, replica))
}

fn field<'a>(fields: &'a Fields, name: &str) -> &'a str {
    fields.get(name).map_or("?", String::as_str)
}
