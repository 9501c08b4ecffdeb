//! How the locker connects to one server by URL: a lazily opened,
//! reconnecting multiplexed connection with TCP_NODELAY and keep-alive, TLS
//! where the URL asks for it, and the bounds on connecting.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::ConnectionAddr;

use super::redis::RedisInstance;
use super::Instance;
use crate::error::Error;
use crate::peer::{self, Peer};

/// How long a new connection to an instance may take to open (TLS handshake
/// included).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The bound on a probe or health check, which may include connecting and, when
/// that fails, asking the peer what it speaks ([`peer`]): long enough for the
/// connection's own error, explained, to arrive first.
pub(crate) const CHECK_TIMEOUT: Duration = CONNECT_TIMEOUT.saturating_add(peer::SNIFF_TIMEOUT);

/// Idle time before TCP keep-alive probes start, and between them.
const KEEPALIVE: Duration = Duration::from_secs(30);

/// Stands in for the TLS settings without the `tls` feature, where
/// `parse_url` refuses TLS URLs.
#[cfg(not(feature = "tls"))]
pub(crate) struct NoTls;

#[cfg(not(feature = "tls"))]
impl NoTls {
    fn has_client_cert(&self) -> bool {
        false
    }
}

#[cfg(not(feature = "tls"))]
pub(crate) type Tls = NoTls;
#[cfg(feature = "tls")]
pub(crate) use crate::tls::Tls;

/// A reconnecting multiplexed connection that opens on first use. Our own
/// per-call timeouts bound every operation, so redis-rs's response timeout is off.
pub(crate) fn lazily(
    index: usize,
    info: redis::ConnectionInfo,
    display: &str,
    tls: &Tls,
) -> crate::Result<Box<dyn Instance>> {
    let invalid = |err: redis::RedisError| Error::InvalidUrl {
        index,
        url: display.to_string(),
        reason: err.to_string(),
    };
    let peer = match info.addr() {
        ConnectionAddr::Tcp(host, port) => Some(Peer::new(host.clone(), *port, false, false)),
        ConnectionAddr::TcpTls { host, port, .. } => {
            Some(Peer::new(host.clone(), *port, true, tls.has_client_cert()))
        }
        _ => None,
    };
    // Nagle's algorithm would hold a command back until the previous one on the
    // same multiplexed connection is acknowledged: a second round trip for every
    // concurrent operation. Keep-alive notices a peer that vanished without a
    // reset while the connection sits idle.
    let keepalive = redis::io::tcp::socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE)
        .with_interval(KEEPALIVE);
    let tcp = redis::io::tcp::TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive);
    let info = info.set_tcp_settings(tcp);
    let client = match info.addr() {
        #[cfg(feature = "tls")]
        ConnectionAddr::TcpTls { insecure, .. } => {
            if *insecure && !tls.insecure() {
                return Err(Error::InvalidUrl {
                    index,
                    url: display.to_string(),
                    reason: "#insecure turns certificate verification off: opt in with \
                             Builder::danger_accept_invalid_certs(true) (qlock: --tls-insecure)"
                        .to_string(),
                });
            }
            crate::tls::install_provider();
            tls.client(info)
        }
        _ => redis::Client::open(info),
    }
    .map_err(invalid)?;
    let pubsub = client.clone();
    let sees_reconnects =
        client.get_connection_info().redis_settings().protocol() == redis::ProtocolVersion::RESP2;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(None)
        // One connection attempt per use: a dead instance then fails its vote at
        // once (connection refused) instead of keeping background work waiting on
        // a retry schedule; the next operation tries again.
        .set_number_of_retries(0);
    let manager = ConnectionManager::new_lazy_with_config(client, config).map_err(invalid)?;
    Ok(Box::new(RedisInstance::with_client(
        manager,
        pubsub,
        peer.map(Arc::new),
        sees_reconnects,
    )))
}

/// A Redis Cluster member from its seed nodes: redis-rs's cluster client,
/// connecting on first use, with NODELAY and keep-alive. Its retries (after
/// MOVED, ASK, TRYAGAIN or a lost connection) are few and a few milliseconds
/// apart, so that they fit in the instance timeout; the locker bounds every call
/// itself.
#[cfg(feature = "cluster")]
pub(crate) fn cluster(
    index: usize,
    seeds: Vec<redis::ConnectionInfo>,
    display: &str,
) -> crate::Result<Box<dyn Instance>> {
    let invalid = |err: redis::RedisError| Error::InvalidUrl {
        index,
        url: display.to_string(),
        reason: err.to_string(),
    };
    let keepalive = redis::io::tcp::socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE)
        .with_interval(KEEPALIVE);
    let tcp = redis::io::tcp::TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive);
    let seed =
        redis::Client::open(seeds[0].clone().set_tcp_settings(tcp.clone())).map_err(invalid)?;
    let client = redis::cluster::ClusterClientBuilder::new(seeds)
        .retries(CLUSTER_RETRIES)
        // Waits of rand(1 ms .. min(20 ms, 2 · 2^retry ms)).
        .min_retry_wait(1)
        .max_retry_wait(20)
        .retry_wait_formula(2, 2)
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(CHECK_TIMEOUT)
        .tcp_settings(tcp)
        .build()
        .map_err(invalid)?;
    let config = redis::cluster::ClusterConfig::new()
        .set_connection_timeout(CONNECT_TIMEOUT)
        .set_response_timeout(CHECK_TIMEOUT);
    let connection = client.get_pending_async_connection_with_config(config);
    Ok(Box::new(super::cluster::ClusterInstance::new(
        connection, seed,
    )))
}

/// How often the cluster client tries a request again (redis-rs's default
/// is 16, at least 1.28 s apart).
#[cfg(feature = "cluster")]
const CLUSTER_RETRIES: u32 = 3;
