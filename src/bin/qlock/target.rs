//! The instances a command works on: the URLs given, or local servers started
//! for the occasion; and the locker over them.

use std::time::Duration;

use quorumlock::testing::{Direction, FaultProxy, RedisCluster};
use quorumlock::{Builder, Error, QuorumLocker, Vote};
use redis::{ConnectionAddr, IntoConnectionInfo};

use crate::args::InstanceArgs;
use crate::error::{notice, CliError};

/// How many local servers to start when no instance is given.
const EMBEDDED_INSTANCES: usize = 3;

/// The instances' URLs, and the local servers behind them when qlock started
/// its own (they stop when this is dropped).
pub struct Instances {
    pub urls: Vec<String>,
    /// The Redis Cluster members, each by its seed nodes' URLs.
    pub clusters: Vec<Vec<String>>,
    _cluster: Option<RedisCluster>,
}

impl Instances {
    /// The URLs given, or else local servers. Blocks while servers start.
    pub fn resolve(args: &InstanceArgs) -> Result<Self, CliError> {
        // Tolerate `a,,b` and a trailing comma in QLOCK_REDIS_URLS.
        let urls: Vec<String> = args
            .redis
            .iter()
            .map(|url| url.trim())
            .filter(|url| !url.is_empty())
            .map(String::from)
            .collect();
        let clusters: Vec<Vec<String>> = args
            .cluster
            .iter()
            .map(|seeds| {
                seeds
                    .split(',')
                    .map(str::trim)
                    .filter(|url| !url.is_empty())
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .collect();
        if clusters.iter().any(Vec::is_empty) {
            return Err(CliError::usage(
                "--cluster needs the URL of at least one of its nodes",
            ));
        }
        if !urls.is_empty() || !clusters.is_empty() {
            return Ok(Self {
                urls,
                clusters,
                _cluster: None,
            });
        }
        let cluster = RedisCluster::start(EMBEDDED_INSTANCES).map_err(|err| {
            CliError::failure(format!(
                "no instances given (--redis URL or QLOCK_REDIS_URLS), and the {EMBEDDED_INSTANCES} \
                 local servers qlock starts instead could not start: {err}"
            ))
        })?;
        let urls = cluster.urls();
        notice!(
            "no --redis or QLOCK_REDIS_URLS given: started {EMBEDDED_INSTANCES} local redis-server \
             processes for this command ({})",
            urls.join(", ")
        );
        Ok(Self {
            urls,
            clusters,
            _cluster: Some(cluster),
        })
    }
}

/// A locker over the instances, with what raw reads of a key need.
pub struct Target {
    pub locker: QuorumLocker,
    /// In the locker's order: the single servers, then the clusters.
    pub urls: Vec<String>,
    /// How many Redis Cluster members follow the URLs.
    pub clusters: usize,
    /// The settings given, for lockers built later over the same instances.
    settings: InstanceArgs,
}

/// A builder with the settings every command shares (no instances yet).
fn builder(args: &InstanceArgs) -> Result<Builder, CliError> {
    let mut builder = QuorumLocker::builder().key_prefix(args.key_prefix.clone());
    if let Some(quorum) = args.quorum {
        builder = builder.quorum(quorum);
    }
    if let Some(factor) = args.drift_factor {
        builder = builder.drift_factor(factor);
    }
    if let Some(timeout) = args.instance_timeout {
        builder = builder.instance_timeout(timeout);
    }
    tls(builder, args)
}

/// The TLS options; the library checks the files when the locker is built.
#[cfg(feature = "tls")]
fn tls(mut builder: Builder, args: &InstanceArgs) -> Result<Builder, CliError> {
    if let Some(ca) = &args.tls_ca {
        builder = builder.tls_ca_file(ca);
    }
    // clap makes --tls-cert and --tls-key go together.
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        builder = builder.tls_client_cert_files(cert, key);
    }
    Ok(builder.danger_accept_invalid_certs(args.tls_insecure))
}

#[cfg(not(feature = "tls"))]
fn tls(builder: Builder, args: &InstanceArgs) -> Result<Builder, CliError> {
    let given = args.tls_ca.is_some()
        || args.tls_cert.is_some()
        || args.tls_key.is_some()
        || args.tls_insecure;
    if given {
        return Err(CliError::usage(
            "--tls-ca, --tls-cert, --tls-key and --tls-insecure (or QLOCK_TLS_*) need qlock \
             built with the `tls` feature (cargo install quorumlock --features cli,tls)",
        ));
    }
    Ok(builder)
}

impl Target {
    /// Builds the locker; a bad URL, quorum, drift factor or timeout is a usage
    /// error. Connects to nothing yet.
    pub async fn build(instances: &Instances, args: &InstanceArgs) -> Result<Self, CliError> {
        let builder = builder(args)?.urls(instances.urls.iter().cloned());
        let builder = instances.clusters.iter().fold(builder, |builder, seeds| {
            builder.cluster(seeds.iter().cloned())
        });
        Ok(Self {
            locker: builder.build().await?,
            urls: instances.urls.clone(),
            clusters: instances.clusters.len(),
            settings: args.clone(),
        })
    }

    /// A locker over the same instances and settings, with the last `slow` of
    /// them reached through proxies that add `latency` to each round trip: a
    /// tolerance run against the user's own servers. The proxies live as long
    /// as the returned vector.
    pub async fn behind_proxies(
        &self,
        slow: usize,
        latency: Duration,
    ) -> Result<(QuorumLocker, Vec<FaultProxy>), CliError> {
        if self.clusters > 0 {
            return Err(CliError::usage(
                "bench --latency slows single servers only: leave out --cluster",
            ));
        }
        let n = self.urls.len();
        let mut builder = builder(&self.settings)?;
        let mut proxies = Vec::new();
        for (index, url) in self.urls.iter().enumerate() {
            if index + slow < n {
                builder = builder.url(url.clone());
                continue;
            }
            let info = url
                .as_str()
                .into_connection_info()
                .map_err(|err| CliError::usage(format!("instance {index}: {err}")))?;
            let ConnectionAddr::Tcp(host, port) = info.addr().clone() else {
                return Err(CliError::usage(format!(
                    "instance {index}: only plain TCP instances can be slowed down"
                )));
            };
            let upstream = tokio::net::lookup_host((host.as_str(), port))
                .await
                .ok()
                .and_then(|mut addrs| addrs.next())
                .ok_or_else(|| {
                    CliError::failure(format!("instance {index}: cannot resolve {host}"))
                })?;
            let proxy = FaultProxy::start(upstream)
                .await
                .map_err(|err| CliError::failure(format!("starting a proxy: {err}")))?;
            // The delay is split between the two directions, as on a real link.
            proxy.set_latency(Direction::Both, latency / 2);
            let info = info.set_addr(ConnectionAddr::Tcp("127.0.0.1".into(), proxy.port()));
            let client = redis::Client::open(info)
                .map_err(|err| CliError::failure(format!("instance {index}: {err}")))?;
            let connection = redis::aio::ConnectionManager::new(client)
                .await
                .map_err(|err| CliError::failure(format!("instance {index} via proxy: {err}")))?;
            builder = builder.connection(format!("instance {index} +{latency:?}"), connection);
            proxies.push(proxy);
        }
        Ok((builder.build().await?, proxies))
    }

    /// The key as stored in Redis. The library applies the prefix the same way
    /// but does not expose the result.
    pub fn redis_key(&self, key: &str) -> String {
        format!("{}{key}", self.settings.key_prefix)
    }

    /// Connects to every instance and loads the scripts: a quick, clear failure
    /// when a quorum is out of reach, instead of retrying until --wait is over.
    pub async fn prepare(&self) -> Result<(), CliError> {
        match self.locker.prepare().await {
            Ok(_) => Ok(()),
            Err(err @ Error::Unavailable { .. }) => Err(self.unreachable(&err)),
            Err(err) => Err(err.into()),
        }
    }

    /// "only 1 of 3 instances reachable, 2 needed: instance 1 (…): failed: …".
    pub fn unreachable(&self, err: &Error) -> CliError {
        let failed: Vec<String> = err
            .causes()
            .iter()
            // Whatever is neither an answer nor "not needed": failed, timed out, or
            // not asked (quarantined).
            .filter(|cause| !matches!(cause.vote, Vote::Granted | Vote::Refused | Vote::Unanswered))
            .map(ToString::to_string)
            .collect();
        let instances = self.locker.instances();
        CliError::failure(format!(
            "only {} of {instances} instance(s) can vote (the others are down or quarantined), {} needed: {}",
            instances - failed.len(),
            self.locker.quorum(),
            failed.join("; ")
        ))
    }
}
