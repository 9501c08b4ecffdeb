//! Builds a [`QuorumLocker`] from instances in order and validated settings.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::ConnectionAddr;

#[cfg(feature = "tls")]
mod tls;

use crate::address;
use crate::background::Background;
use crate::error::Error;
use crate::handoff::Handoff;
use crate::instance::connect;
use crate::instance::redis::RedisInstance;
use crate::instance::Instance;
use crate::lease::{Lease, MAX_TTL};
use crate::locker::QuorumLocker;
use crate::monitor::handle::Monitor;
use crate::names::EPOCH_KEY;
use crate::quorum;
use crate::retry::RetryPolicy;
use crate::shared::{Settings, Shared};
use crate::standing::member::Member;
use crate::standing::policy::Policy;
use crate::standing::state::InstanceState;

/// The per-instance timeout unless set: a LAN round trip is well under a
/// millisecond, so 50 ms means the instance is in trouble, and it is short next
/// to typical TTLs (the Redlock paper suggests 5–50 ms for a 10 s TTL).
pub const DEFAULT_INSTANCE_TIMEOUT: Duration = Duration::from_millis(50);

/// The TTL returned by [`QuorumLocker::default_ttl`] unless set.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// How long `acquire` keeps retrying unless set.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(10);

/// The clock-drift factor unless set: 1% of the TTL (plus 2 ms), as in the Redlock
/// description.
pub const DEFAULT_DRIFT_FACTOR: f64 = 0.01;

/// How often each instance's `run_id` and clock are probed unless set.
pub const DEFAULT_PROBE_EVERY: Duration = Duration::from_secs(1);

/// Configures and builds a [`QuorumLocker`]; start with [`QuorumLocker::builder`].
///
/// Instances vote in the order given, and that order is how errors and reports
/// refer to them (index 0 is the first). Every setting is checked in
/// [`build`](Self::build), which reports the first problem as a typed [`Error`].
#[must_use = "a builder does nothing until `build` is called"]
pub struct Builder {
    sources: Vec<Source>,
    quorum: Option<usize>,
    default_ttl: Duration,
    drift_factor: f64,
    instance_timeout: Duration,
    retry: RetryPolicy,
    default_wait: Duration,
    key_prefix: String,
    restart_quarantine: Option<Duration>,
    quarantine_fast_clocks: bool,
    rate_aware_validity: bool,
    probe_every: Duration,
    wake_waiters: bool,
    #[cfg(feature = "tls")]
    pub(crate) tls: crate::tls::TlsSettings,
}

enum Source {
    Url(String),
    #[cfg(feature = "cluster")]
    Cluster(Vec<String>),
    Sentinel(crate::SentinelMember),
    Connection {
        name: String,
        instance: Box<dyn Instance>,
    },
}

impl Builder {
    pub(crate) fn new() -> Self {
        Self {
            sources: Vec::new(),
            quorum: None,
            default_ttl: DEFAULT_TTL,
            drift_factor: DEFAULT_DRIFT_FACTOR,
            instance_timeout: DEFAULT_INSTANCE_TIMEOUT,
            retry: RetryPolicy::default(),
            default_wait: DEFAULT_WAIT,
            key_prefix: String::new(),
            restart_quarantine: None,
            quarantine_fast_clocks: false,
            rate_aware_validity: true,
            wake_waiters: false,
            probe_every: DEFAULT_PROBE_EVERY,
            #[cfg(feature = "tls")]
            tls: crate::tls::TlsSettings::default(),
        }
    }

    /// Adds an instance by URL: `redis://[user[:password]@]host[:port][/db]`,
    /// `rediss://…` (TLS, with the `tls` feature; see
    /// [`tls_ca_file`](Self::tls_ca_file)) or `redis+unix:///path`, and the same
    /// with `valkey://`, `valkeys://` and `valkey+unix://`. The connection opens
    /// lazily and reconnects by itself.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.sources.push(Source::Url(url.into()));
        self
    }

    /// Adds a Redis Cluster as one member (feature `cluster`), by the URLs of
    /// some of its nodes (`redis://host:port`; any node will do, more than one
    /// in case one is down). Each lock key runs on its slot's primary; the
    /// member grants where that primary does. Members of both kinds mix freely:
    /// `[cluster A, cluster B, single server C]`.
    ///
    /// On such a locker a lock key must fit one slot with its fencing counter:
    /// a key with a hash tag (`{job}`) or without braces at all; any other
    /// is refused as [`Error::KeyNotForCluster`]. The fencing counter of a key
    /// without a tag is `{key}:fence` on a cluster (`key:fence` elsewhere).
    ///
    /// A primary that restarts, loses its keys, or is replaced by a replica
    /// (a failover), and a slot that moves, quarantine the whole member as a
    /// restart quarantines a server (see [`restart_quarantine`](Self::restart_quarantine)).
    /// TLS seeds (`rediss://`) are not supported yet.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), quorumlock::Error> {
    /// let locker = quorumlock::QuorumLocker::builder()
    ///     .cluster(["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"])
    ///     .cluster(["redis://10.0.1.1:7000", "redis://10.0.1.2:7000"])
    ///     .url("redis://10.0.2.1:6379")
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "cluster")]
    pub fn cluster<I>(mut self, seeds: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.sources
            .push(Source::Cluster(seeds.into_iter().map(Into::into).collect()));
        self
    }

    /// Adds a Sentinel-managed primary as one member: the member asks the
    /// Sentinels where the primary is and follows a failover to the replica
    /// promoted. A failover quarantines the member as a restart does (the
    /// replica may lack recent locks); [`SentinelMember::wait_for_replicas`](crate::SentinelMember::wait_for_replicas)
    /// makes each grant wait until replicas have it. With
    /// [`wake_waiters`](Self::wake_waiters), waiters subscribe on the primary
    /// the Sentinels name at each (re)subscription. TLS to Sentinels is not
    /// supported yet.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), quorumlock::Error> {
    /// use quorumlock::{QuorumLocker, SentinelMember};
    ///
    /// let locker = QuorumLocker::builder()
    ///     .sentinel(SentinelMember::new("locks", ["redis://10.0.0.1:26379", "redis://10.0.0.2:26379"]))
    ///     .url("redis://10.0.1.1:6379")
    ///     .url("redis://10.0.2.1:6379")
    ///     .build()
    ///     .await?;
    /// # drop(locker); Ok(()) }
    /// ```
    pub fn sentinel(mut self, member: crate::SentinelMember) -> Self {
        self.sources.push(Source::Sentinel(member));
        self
    }

    /// Adds instances by URL, in order.
    pub fn urls<I>(mut self, urls: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.sources
            .extend(urls.into_iter().map(|url| Source::Url(url.into())));
        self
    }

    /// Adds an instance through a connection you made: a
    /// [`ConnectionManager`](redis::aio::ConnectionManager), a [`MultiplexedConnection`](redis::aio::MultiplexedConnection)
    /// or any cloneable async connection. Each operation clones it, so it should
    /// be a multiplexed one. `name` shows in errors and must be unique.
    ///
    /// Open it with `TCP_NODELAY` (as the locker does for URLs): with Nagle's
    /// algorithm, concurrent operations on one multiplexed connection wait for
    /// each other's acknowledgements, a second round trip each. With redis-rs:
    /// `ConnectionInfo::set_tcp_settings(TcpSettings::default().set_nodelay(true))`.
    /// Leave redis-rs's response timeout off or above the instance timeout:
    /// the locker bounds every request itself.
    pub fn connection<C>(mut self, name: impl Into<String>, connection: C) -> Self
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        self.sources.push(Source::Connection {
            name: name.into(),
            instance: Box::new(RedisInstance::new(connection)),
        });
        self
    }

    /// Adds an in-process [`MemoryInstance`](crate::MemoryInstance): for unit tests
    /// of code that takes locks, and for simulating slow, failing or drifting
    /// instances without Redis. Its name shows in errors and must be unique.
    pub fn memory(mut self, instance: &crate::MemoryInstance) -> Self {
        self.sources.push(Source::Connection {
            name: instance.name().to_string(),
            instance: instance.instance(),
        });
        self
    }

    /// How many instances must grant a lock. Default: a majority, `N / 2 + 1`.
    /// Must be more than `N / 2` (or two owners could win at once) and at most `N`.
    pub fn quorum(mut self, quorum: usize) -> Self {
        self.quorum = Some(quorum);
        self
    }

    /// The TTL for callers that use [`QuorumLocker::default_ttl`]. Default: 10 s.
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// The fraction of the TTL set aside for clock drift between this process and
    /// the servers; the validity is `ttl − elapsed − (ttl × factor + 2 ms)`.
    /// Default: 0.01. Must be finite, at least 0 and below 1.
    pub fn drift_factor(mut self, factor: f64) -> Self {
        self.drift_factor = factor;
        self
    }

    /// How long to wait for one instance's reply before counting it as a failed
    /// vote. Default: [`DEFAULT_INSTANCE_TIMEOUT`] (50 ms). Must be non-zero.
    pub fn instance_timeout(mut self, timeout: Duration) -> Self {
        self.instance_timeout = timeout;
        self
    }

    /// The delays between `acquire`'s attempts. Default: [`RetryPolicy::default`].
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// How long `acquire` keeps retrying before giving up. Default: 10 s. At
    /// least one attempt is always made.
    pub fn default_wait(mut self, timeout: Duration) -> Self {
        self.default_wait = timeout;
        self
    }

    /// A prefix put before every key in Redis (`"locks:"` makes `job` into
    /// `locks:job`). Default: none.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// The least time an instance that lost its keys (restarted without
    /// persistence, flushed, failed over: its epoch or `run_id` changed) may not
    /// vote in acquisitions. Its vote could hand a second owner a lock that is
    /// still held; once every lock it could have held has expired, it is safe
    /// again. The locker makes it longer by itself where the servers say a
    /// longer TTL was ever set there (the epoch hash's `ttl`, which every grant
    /// and extend raises and nothing lowers: after retiring a long lock,
    /// `HDEL <prefix>quorumlock:epoch ttl` on each server lowers it, once that
    /// lock's TTL has passed). With several instances, the others' hashes tell
    /// it the longest TTL the lost one held; a lone instance has no others, so
    /// over one instance set this to at least the longest TTL any locker uses
    /// there. Default: the [`default_ttl`](Self::default_ttl).
    /// Zero turns the checks off: no epoch check in grants, no quarantine.
    ///
    /// A grant on a server that lost its keys is refused in its own script; a
    /// probe (every [`probe_every`](Self::probe_every), and at once after a
    /// failure) starts the quarantine. Until a probe sent after the failure
    /// answers, an instance whose request failed does not vote either.
    pub fn restart_quarantine(mut self, quarantine: Duration) -> Self {
        self.restart_quarantine = Some(quarantine);
        self
    }

    /// Refuses votes from instances whose clock runs faster than
    /// `1 / (1 − drift_factor)` times ours (as measured by the probes), so that a
    /// lock needs a quorum of trustworthy clocks or fails with
    /// [`Quarantine::ClockDrift`](crate::Quarantine::ClockDrift) in its causes.
    /// Default: off. Even off, a lock's validity is shortened to what its
    /// granting instances' clock-rate bounds allow.
    pub fn quarantine_fast_clocks(mut self, on: bool) -> Self {
        self.quarantine_fast_clocks = on;
        self
    }

    /// Whether a lock's validity is shortened to what the clock-rate bounds of
    /// its granting instances allow (see the crate docs, "Clock drift"). Default:
    /// on. Turning it off gives plain Redlock validity, for comparisons.
    pub fn rate_aware_validity(mut self, on: bool) -> Self {
        self.rate_aware_validity = on;
        self
    }

    /// How often every instance is probed for its identity and clock (`INFO
    /// server`, `TIME` and the epoch hash, in one round trip; every 40 ms while
    /// an instance is not yet measured). Default: [`DEFAULT_PROBE_EVERY`] (1 s).
    /// Must be non-zero.
    pub fn probe_every(mut self, every: Duration) -> Self {
        self.probe_every = every;
        self
    }

    /// Wakes waiting acquires as soon as the lock they wait for is released,
    /// instead of at their next timed retry. Default: off.
    ///
    /// With it on, a release publishes on the channel
    /// `quorumlock:released:<key>` ([`RELEASE_CHANNEL_PREFIX`](crate::RELEASE_CHANNEL_PREFIX)
    /// followed by the key with its prefix) on every instance it deletes from,
    /// inside its script (no extra round trip). A waiting `acquire` subscribes —
    /// one subscription connection per instance, shared by every wait of this
    /// locker and opened only while something waits — and retries at once when a
    /// release arrives. It still keeps its timed retries, so a lost message, a
    /// failed subscription or a release by a locker without this option costs
    /// only the usual delay.
    ///
    /// - Works with URL instances and [`memory`](Self::memory) instances (in
    ///   process). Instances given as a [`connection`](Self::connection) cannot
    ///   open a subscription connection like it: waits on them fall back to
    ///   timed retries, silently.
    /// - Only lockers with this option publish: turn it on for every process that
    ///   releases the keys you wait for. With Redis ACLs the user needs
    ///   `&quorumlock:released:*` (Redis 7 denies channels by default), or every
    ///   release fails.
    /// - Fairness: a woken waiter that has waited long retries at once, a newer
    ///   one half a millisecond later, and a locker that has just released a key
    ///   holds back from it for 2 ms, so a steady stream of contenders does not
    ///   starve anyone who waits (the `handoff` bench reports the worst wait).
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use quorumlock::{MemoryInstance, QuorumLocker, RetryPolicy};
    ///
    /// let redis = MemoryInstance::new("redis");
    /// let locker = QuorumLocker::builder()
    ///     .memory(&redis)
    ///     .wake_waiters(true)
    ///     .retry(RetryPolicy::fixed(Duration::from_secs(5))) // fallback only
    ///     .build()
    ///     .await?;
    /// let held = locker.acquire("report", Duration::from_secs(30)).await?;
    /// let waiter = tokio::spawn({
    ///     let locker = locker.clone();
    ///     async move { locker.acquire("report", Duration::from_secs(30)).await }
    /// });
    /// tokio::time::sleep(Duration::from_millis(20)).await;
    /// let released = tokio::time::Instant::now();
    /// held.release().await?;
    /// let lock = waiter.await.unwrap()?;
    /// assert!(released.elapsed() < Duration::from_secs(1)); // not the 5 s retry
    /// # drop(lock);
    /// # Ok::<_, quorumlock::Error>(())
    /// # }).unwrap();
    /// ```
    pub fn wake_waiters(mut self, on: bool) -> Self {
        self.wake_waiters = on;
        self
    }

    /// Checks every setting and builds the locker. Connections open on first use
    /// (or in [`QuorumLocker::prepare`]), so a minority of instances being down
    /// does not stop the build.
    ///
    /// # Errors
    ///
    /// [`Error::NoRuntime`] outside a Tokio runtime; [`Error::NoInstances`],
    /// [`Error::InvalidUrl`], [`Error::DuplicateInstance`],
    /// [`Error::QuorumOutOfRange`], [`Error::InvalidTtl`] (the default TTL) or
    /// [`Error::InvalidConfig`] for bad settings, TLS files included (read
    /// here: a missing or unusable certificate is reported before anything
    /// connects).
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use quorumlock::{MemoryInstance, QuorumLocker};
    ///
    /// let redis = MemoryInstance::new("redis");
    /// let locker = QuorumLocker::builder().memory(&redis).build().await?;
    /// let locker = QuorumLocker::builder()
    ///     .memory(&MemoryInstance::new("a"))
    ///     .memory(&MemoryInstance::new("b"))
    ///     .memory(&MemoryInstance::new("c"))
    ///     .default_ttl(Duration::from_secs(5))
    ///     .build()
    ///     .await?;
    /// assert_eq!(locker.quorum(), 2);
    /// # drop(redis);
    /// # Ok::<_, quorumlock::Error>(())
    /// # }).unwrap();
    /// ```
    pub async fn build(self) -> crate::Result<QuorumLocker> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::NoRuntime);
        }
        if self.sources.is_empty() {
            return Err(Error::NoInstances);
        }
        if !(self.drift_factor.is_finite() && (0.0..1.0).contains(&self.drift_factor)) {
            return Err(Error::InvalidConfig {
                setting: "drift_factor",
                reason: format!(
                    "{} is not finite, at least 0 and below 1",
                    self.drift_factor
                ),
            });
        }
        // Beyond MAX_TTL a duration means "forever" and only risks overflowing
        // the instant arithmetic it feeds.
        for (setting, duration) in [
            ("instance_timeout", self.instance_timeout),
            ("default_wait", self.default_wait),
            ("probe_every", self.probe_every),
            (
                "restart_quarantine",
                self.restart_quarantine.unwrap_or_default(),
            ),
        ] {
            if duration > MAX_TTL {
                return Err(Error::InvalidConfig {
                    setting,
                    reason: format!("{duration:?} is longer than quorumlock::MAX_TTL"),
                });
            }
        }
        if self.probe_every.is_zero() {
            return Err(Error::InvalidConfig {
                setting: "probe_every",
                reason: "zero would probe without pause".to_string(),
            });
        }
        if self.instance_timeout.is_zero() {
            return Err(Error::InvalidConfig {
                setting: "instance_timeout",
                reason: "zero would fail every vote".to_string(),
            });
        }
        Lease::new(self.default_ttl, self.drift_factor)?;
        let n = self.sources.len();
        let quorum = self.quorum.unwrap_or(quorum::majority(n));
        if !quorum::quorum_in_range(n, quorum) {
            return Err(Error::QuorumOutOfRange {
                quorum,
                instances: n,
            });
        }

        #[cfg(feature = "tls")]
        let tls = self.tls.load()?;
        #[cfg(not(feature = "tls"))]
        let tls = connect::NoTls;
        // Read only with the `tls` feature.
        let mut uses_tls = false;

        let mut members = Vec::with_capacity(n);
        // Each member's servers as named: a cluster names several.
        let mut identities: Vec<Vec<String>> = Vec::with_capacity(n);
        #[cfg_attr(not(feature = "cluster"), allow(unused_mut))]
        let mut clustered = false;
        for (index, source) in self.sources.into_iter().enumerate() {
            let (identity, address, instance) = match source {
                Source::Url(url) => {
                    let parsed = address::parse_url(index, &url)?;
                    uses_tls |= matches!(parsed.info.addr(), ConnectionAddr::TcpTls { .. });
                    let instance = connect::lazily(index, parsed.info, &parsed.display, &tls)?;
                    (vec![parsed.identity], parsed.display, instance)
                }
                #[cfg(feature = "cluster")]
                Source::Cluster(seeds) => {
                    clustered = true;
                    cluster_member(index, &seeds)?
                }
                Source::Sentinel(member) => sentinel_member(index, &member, self.instance_timeout)?,
                Source::Connection { name, instance } => (vec![name.clone()], name, instance),
            };
            let seen_before = |seen: &Vec<String>| seen.iter().any(|name| identity.contains(name));
            if let Some(first) = identities.iter().position(seen_before) {
                return Err(Error::DuplicateInstance {
                    first,
                    second: index,
                    address,
                });
            }
            identities.push(identity);
            members.push(Member {
                index,
                address: address.into(),
                instance,
                state: Arc::new(InstanceState::new()),
            });
        }
        if clustered && self.key_prefix.contains(['{', '}']) {
            // A brace in the prefix would make its own hash tag, or break the
            // one of the key after it: a lock's keys would land in other slots.
            return Err(Error::InvalidConfig {
                setting: "key_prefix",
                reason: format!(
                    "{:?} holds a brace, which a Redis Cluster member would read as a hash tag",
                    self.key_prefix
                ),
            });
        }
        #[cfg(feature = "tls")]
        if let Some(setting) = self.tls.any_setting().filter(|_| !uses_tls) {
            // Most likely a redis:// URL meant to be rediss://.
            return Err(Error::InvalidConfig {
                setting,
                reason: "no instance URL uses TLS (rediss:// or valkeys://)".to_string(),
            });
        }
        let _ = uses_tls;

        let policy = Policy {
            restart_quarantine: self.restart_quarantine.unwrap_or(self.default_ttl),
            max_clock_rate: self
                .quarantine_fast_clocks
                .then(|| 1.0 / (1.0 - self.drift_factor)),
            rate_aware_validity: self.rate_aware_validity,
            probe_every: self.probe_every,
        };
        let handoff = self.wake_waiters.then(|| Handoff::start(&members));
        Ok(QuorumLocker::start(Shared {
            handoff,
            members,
            quorum,
            settings: Settings {
                default_ttl: self.default_ttl,
                drift_factor: self.drift_factor,
                instance_timeout: self.instance_timeout,
                retry: self.retry,
                default_wait: self.default_wait,
                epoch_key: format!("{}{EPOCH_KEY}", self.key_prefix).into(),
                key_prefix: self.key_prefix,
                policy,
                clustered,
            },
            background: Background::new(),
            monitor: Monitor::new(),
            longest_ttl_ms: AtomicU64::new(0),
        }))
    }
}

/// A cluster member from its seed URLs: the servers it names, how it is shown,
/// and the instance.
#[cfg(feature = "cluster")]
fn cluster_member(
    index: usize,
    seeds: &[String],
) -> crate::Result<(Vec<String>, String, Box<dyn Instance>)> {
    let Some(first) = seeds.first() else {
        return Err(Error::InvalidConfig {
            setting: "cluster",
            reason: format!("member {index} names no seed node"),
        });
    };
    let mut names = Vec::with_capacity(seeds.len());
    let mut infos = Vec::with_capacity(seeds.len());
    let mut display = String::new();
    for seed in seeds {
        let parsed = address::parse_url(index, seed)?;
        let refuse = |reason: &str| Error::InvalidUrl {
            index,
            url: parsed.display.clone(),
            reason: reason.to_string(),
        };
        match parsed.info.addr() {
            ConnectionAddr::Tcp(..) => {}
            ConnectionAddr::TcpTls { .. } => {
                return Err(refuse("TLS to a Redis Cluster member is not supported yet"))
            }
            _ => return Err(refuse("a Redis Cluster's nodes are reached over TCP")),
        }
        if seed == first {
            display = format!("cluster {}", parsed.display);
        }
        names.push(parsed.identity);
        infos.push(parsed.info);
    }
    if seeds.len() > 1 {
        display.push_str(&format!(" (+{} seeds)", seeds.len() - 1));
    }
    let instance = connect::cluster(index, infos, &display)?;
    Ok((names, display, instance))
}

/// A Sentinel member: the Sentinels it names (and its service), how it is
/// shown, and the instance.
fn sentinel_member(
    index: usize,
    member: &crate::SentinelMember,
    instance_timeout: Duration,
) -> crate::Result<(Vec<String>, String, Box<dyn Instance>)> {
    if member.sentinels.is_empty() || member.service.is_empty() {
        return Err(Error::InvalidConfig {
            setting: "sentinel",
            reason: format!("member {index} needs a service name and at least one Sentinel URL"),
        });
    }
    if let Some((replicas, timeout)) = member.wait {
        let reason = if replicas == 0 {
            Some("0 replicas would wait for nothing".to_string())
        } else if timeout < Duration::from_millis(1) {
            // `WAIT n 0` waits for ever, holding its connection.
            Some(format!(
                "a timeout of {timeout:?} is below WAIT's 1 ms (0 would wait for ever)"
            ))
        } else if timeout >= instance_timeout {
            Some(format!(
                "a timeout of {timeout:?} is not below the instance timeout ({instance_timeout:?}), which would cut every WAIT short"
            ))
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(Error::InvalidConfig {
                setting: "wait_for_replicas",
                reason,
            });
        }
    }
    let mut names = Vec::with_capacity(member.sentinels.len());
    let mut clients = Vec::with_capacity(member.sentinels.len());
    let mut display = String::new();
    for url in &member.sentinels {
        let parsed = address::parse_url(index, url)?;
        if !matches!(parsed.info.addr(), ConnectionAddr::Tcp(..)) {
            return Err(Error::InvalidUrl {
                index,
                url: parsed.display,
                reason: "Sentinels are reached over plain TCP (TLS is not supported yet)"
                    .to_string(),
            });
        }
        if display.is_empty() {
            display = format!("sentinel {:?} via {}", member.service, parsed.display);
        }
        names.push(format!("{}@{}", member.service, parsed.identity));
        let client = redis::Client::open(parsed.info).map_err(|err| Error::InvalidUrl {
            index,
            url: parsed.display.clone(),
            reason: err.to_string(),
        })?;
        clients.push(client);
    }
    let instance = crate::instance::sentinel::SentinelInstance::new(member, clients);
    Ok((names, display, Box::new(instance)))
}
