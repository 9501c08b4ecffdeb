//! A Sentinel-managed primary as one quorum member: the
//! member asks the Sentinels where the primary is, talks to it over one
//! multiplexed connection, and follows a failover to the new primary.
//!
//! - **Following.** Every probe asks a Sentinel for the primary's address
//!   (`SENTINEL get-master-addr-by-name`) and checks the server there says it
//!   is a primary (`ROLE`); a new address gets a new connection. A request
//!   that fails on the connection, or that a demoted primary refuses
//!   (`READONLY`), drops it, and the next probe connects afresh.
//! - **A failover is a restart.** The promoted replica has the epoch hash
//!   (replicated long ago) but another `run_id`, and asynchronous replication
//!   may have lost recent locks: every grant checks the `run_id` it was
//!   admitted with against the one a probe read on the very connection it goes
//!   out on (which never reconnects by itself, so no `INFO` per grant is
//!   needed), and the probe that sees the new `run_id` quarantines the member
//!   for the longest TTL. The identity is the `run_id` with `master_replid`
//!   (a failback to the same process changes the second). The epoch hash
//!   records the identity and since when (`RECORD_PRIMARY`): a locker that
//!   starts after a failover, and never saw the old primary, still sits out
//!   the rest of the quarantine.
//! - **`WAIT` after a grant** (opt-in, [`SentinelMember::wait_for_replicas`]):
//!   a grant counts only once that many replicas acknowledged it, so that a
//!   promoted replica has it. Otherwise the vote fails, and the attempt rolls
//!   the key back as for any failed vote.
//!
//! redis-rs's own Sentinel client opens a new connection to the primary each
//! time it resolves it (to check its role); the member resolves every probe,
//! so it keeps its connections instead.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ErrorKind, IntoConnectionInfo, RedisError, Value};

use super::connect::{CHECK_TIMEOUT, CONNECT_TIMEOUT};
use super::is_connection_failure;
use super::redis::RedisInstance;
use super::{
    info_field, BoxFuture, Instance, Peeked, Probe, PubSubSource, Reply, Request, Resolver,
};
use crate::epoch::{self, Epoch};
use crate::scripts;

/// A Sentinel-managed primary, as given to
/// [`Builder::sentinel`](crate::Builder::sentinel): the service name the
/// Sentinels monitor, their URLs, and how the member treats grants.
///
/// # Example
///
/// ```no_run
/// # async fn run() -> Result<(), quorumlock::Error> {
/// use std::time::Duration;
/// use quorumlock::{QuorumLocker, SentinelMember};
///
/// let member = SentinelMember::new(
///     "locks",
///     ["redis://10.0.0.1:26379", "redis://10.0.0.2:26379", "redis://10.0.0.3:26379"],
/// )
/// .wait_for_replicas(1, Duration::from_millis(20));
/// let locker = QuorumLocker::builder()
///     .sentinel(member)
///     .url("redis://10.0.1.1:6379")
///     .url("redis://10.0.2.1:6379")
///     .build()
///     .await?;
/// # drop(locker); Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SentinelMember {
    pub(crate) service: String,
    pub(crate) sentinels: Vec<String>,
    pub(crate) wait: Option<(usize, Duration)>,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
}

impl SentinelMember {
    /// The primary the Sentinels at `sentinels` (`redis://host:port` URLs,
    /// with the Sentinels' own credentials if any) monitor as `service`.
    pub fn new<I>(service: impl Into<String>, sentinels: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        Self {
            service: service.into(),
            sentinels: sentinels.into_iter().map(Into::into).collect(),
            wait: None,
            username: None,
            password: None,
        }
    }

    /// Counts a grant only once `replicas` replicas acknowledged it (`WAIT
    /// replicas timeout`), so that a failover to one of them keeps the lock;
    /// extends and fencing write-backs wait the same way (a promoted replica
    /// then has the TTL and the counter too). Costs a replication round trip
    /// per grant, and fails every grant while fewer replicas are in sync.
    /// These writes go out on a connection of their own, so that the others
    /// never wait behind a `WAIT`. `timeout` is what `WAIT` waits: at least
    /// 1 ms and below the instance timeout, or the builder refuses it.
    #[must_use]
    pub fn wait_for_replicas(mut self, replicas: usize, timeout: Duration) -> Self {
        self.wait = Some((replicas, timeout));
        self
    }

    /// The password (and user, for ACLs) of the primary and replicas, where
    /// they need one: the Sentinels' URLs carry only the Sentinels' own.
    #[must_use]
    pub fn auth(mut self, username: Option<String>, password: impl Into<String>) -> Self {
        self.username = username;
        self.password = Some(password.into());
        self
    }
}

/// The member: where the primary is, and how to reach it.
pub(crate) struct SentinelInstance {
    wait: Option<(usize, Duration)>,
    finder: Arc<Finder>,
}

/// How the member finds its primary, and what it found: shared with the
/// futures and the subscription that outlive a call.
struct Finder {
    service: Arc<str>,
    sentinels: Vec<redis::Client>,
    /// The connection to the Sentinel that answered last, by index: asked
    /// first at the next probe, instead of a connection opened every second.
    asked: Mutex<Option<(usize, MultiplexedConnection)>>,
    auth: (Option<String>, Option<String>),
    /// A second connection to the primary, for the writes followed by `WAIT`.
    replicated: bool,
    current: Mutex<Option<Current>>,
}

/// The primary the member talks to now.
#[derive(Clone)]
struct Current {
    host: String,
    port: u16,
    /// A multiplexed connection never reconnects by itself: it reaches one
    /// server process for as long as it lasts.
    connection: MultiplexedConnection,
    /// With `wait_for_replicas`: the connection for the writes followed by
    /// `WAIT`.
    replicated: Option<MultiplexedConnection>,
    /// That process's identity as the member shows it (`run_id` and
    /// `master_replid`) and its bare `run_id`, once a probe on this
    /// connection read them.
    run_id: Option<(Arc<str>, Arc<str>)>,
    /// Which connection this is: a probe records what it read only on the
    /// connection it read it on, not on a newer one to the same address.
    token: Arc<()>,
}

fn lock(current: &Mutex<Option<Current>>) -> MutexGuard<'_, Option<Current>> {
    current.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SentinelInstance {
    pub(crate) fn new(member: &SentinelMember, sentinels: Vec<redis::Client>) -> Self {
        Self {
            wait: member.wait,
            finder: Arc::new(Finder {
                service: member.service.as_str().into(),
                sentinels,
                asked: Mutex::default(),
                auth: (member.username.clone(), member.password.clone()),
                replicated: member.wait.is_some(),
                current: Mutex::default(),
            }),
        }
    }

    /// The connection to the primary, if the member has one.
    fn connection(&self) -> Result<(MultiplexedConnection, String, u16), RedisError> {
        self.current()
            .map(|current| (current.connection, current.host, current.port))
    }

    fn current(&self) -> Result<Current, RedisError> {
        lock(&self.finder.current).clone().ok_or_else(|| {
            RedisError::from(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "no primary known yet: the next probe asks the Sentinels",
            ))
        })
    }
}

impl SentinelInstance {
    /// The connection to the primary, found through the Sentinels where the
    /// member has none (off the grants' path: they fail at once instead).
    fn primary(&self) -> BoxFuture<Result<MultiplexedConnection, RedisError>> {
        let kept = self.connection().ok();
        let finder = Arc::clone(&self.finder);
        Box::pin(async move {
            match kept {
                Some((connection, _, _)) => Ok(connection),
                None => Ok(finder.follow().await?.0),
            }
        })
    }
}

/// Drops the connection to `host:port` after `err`, where it means the
/// connection or the server's role went: the next probe connects afresh.
fn forget_on(current: &Mutex<Option<Current>>, host: &str, port: u16, err: &RedisError) {
    let readonly = err.kind() == ErrorKind::Server(redis::ServerErrorKind::ReadOnly);
    if is_connection_failure(err) || readonly {
        let mut current = lock(current);
        if current
            .as_ref()
            .is_some_and(|now| now.host == host && now.port == port)
        {
            *current = None;
        }
    }
}

impl Finder {
    /// Asks the Sentinels where the primary is: the one that answered last
    /// first, over its kept connection, then the others in order.
    async fn resolve(&self) -> Result<(String, u16), RedisError> {
        let kept = self
            .asked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let first = kept.as_ref().map_or(0, |(index, _)| *index);
        let mut last = None;
        for index in (0..self.sentinels.len()).map(|i| (first + i) % self.sentinels.len()) {
            let kept = kept
                .as_ref()
                .filter(|(at, _)| *at == index)
                .map(|(_, connection)| connection.clone());
            let answer = async {
                let mut connection = match kept {
                    Some(connection) => connection,
                    None => {
                        let config = AsyncConnectionConfig::new()
                            .set_connection_timeout(Some(CONNECT_TIMEOUT))
                            .set_response_timeout(Some(CONNECT_TIMEOUT));
                        self.sentinels[index]
                            .get_multiplexed_async_connection_with_config(&config)
                            .await?
                    }
                };
                let address = redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&*self.service)
                    .query_async::<Option<(String, u16)>>(&mut connection)
                    .await?;
                Ok::<_, RedisError>((address, connection))
            };
            match answer.await {
                Ok((Some(address), connection)) => {
                    *self.asked.lock().unwrap_or_else(PoisonError::into_inner) =
                        Some((index, connection));
                    return Ok(address);
                }
                Ok((None, _)) => {
                    last = Some(RedisError::from((
                        ErrorKind::Client,
                        "unknown service",
                        format!("the Sentinels monitor no primary named {:?}", self.service),
                    )))
                }
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| {
            RedisError::from((
                ErrorKind::Client,
                "no Sentinel",
                "none was given".to_string(),
            ))
        }))
    }
}

impl Instance for SentinelInstance {
    fn eval(&self, request: &Request<'_>) -> BoxFuture<Reply> {
        let Current {
            host,
            port,
            connection,
            replicated,
            run_id,
            ..
        } = match self.current() {
            Ok(found) => found,
            Err(err) => return Box::pin(async move { Err(err) }),
        };
        // With `wait_for_replicas`, the writes a failover must keep (grants,
        // extends, fencing write-backs) go out on a connection of their own,
        // each followed by `WAIT`: `WAIT` blocks its connection, and counts
        // only that connection's writes. That connection's grants keep the
        // `INFO` check in the script (the probe reads the `run_id` on the
        // other one).
        let wait = self.wait.filter(|_| {
            matches!(
                request,
                Request::Grant { .. } | Request::Extend { .. } | Request::FenceWriteBack { .. }
            )
        });
        let checked;
        let request = match *request {
            Request::Grant {
                key,
                value,
                ttl_ms,
                retake,
                fence,
                epoch: Some(epoch),
            } => {
                // The grant's identity check, made here: the connection
                // reaches one process, whose identity the probe read on it.
                let known = run_id.as_ref().map(|(shown, _)| shown);
                if epoch.run_id.is_some() && epoch.run_id.as_ref() != known {
                    return Box::pin(async { Err(epoch::changed()) });
                }
                checked = Epoch {
                    // On the connection for replicated writes, the script
                    // checks the bare `run_id` too; on the probed one it
                    // need not (no `INFO` per grant).
                    run_id: wait.and(run_id.as_ref()).map(|(_, bare)| Arc::clone(bare)),
                    ..epoch.clone()
                };
                Request::Grant {
                    key,
                    value,
                    ttl_ms,
                    retake,
                    fence,
                    epoch: Some(&checked),
                }
            }
            other => other,
        };
        let finder = Arc::clone(&self.finder);
        let (mut waiting, run) = match (wait, replicated) {
            (Some(_), Some(replicated)) => (
                Some(replicated.clone()),
                RedisInstance::new(replicated).eval(&request),
            ),
            (Some(_), None) => {
                return Box::pin(async {
                    Err(RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::NotConnected,
                        "no connection for replicated writes yet: the next probe opens one",
                    )))
                })
            }
            (None, _) => (None, RedisInstance::new(connection).eval(&request)),
        };
        Box::pin(async move {
            let reply = run.await;
            let reply = match (reply, wait, waiting.as_mut()) {
                (Ok(counted), Some((replicas, timeout)), Some(waiting)) if counted > 0 => {
                    let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
                    let acknowledged: Result<usize, RedisError> = redis::cmd("WAIT")
                        .arg(replicas)
                        .arg(ms)
                        .query_async(waiting)
                        .await;
                    match acknowledged {
                        Ok(acked) if acked >= replicas => Ok(counted),
                        Ok(acked) => Err(RedisError::from((
                            ErrorKind::Client,
                            "not replicated",
                            format!("{acked} of the {replicas} replicas asked for acknowledged the write in {timeout:?}"),
                        ))),
                        Err(err) => Err(err),
                    }
                }
                (reply, _, _) => reply,
            };
            if let Err(err) = &reply {
                forget_on(&finder.current, &host, port, err);
            }
            reply
        })
    }

    fn sees_reconnects(&self) -> bool {
        // Grants carry the run_id they were admitted with, checked in `eval`.
        false
    }

    fn failover_lag(&self, probe_every: Duration) -> Duration {
        // Until every other locker's next probe, answered or timed out.
        probe_every.saturating_add(CHECK_TIMEOUT)
    }

    fn pubsub(&self) -> Option<PubSubSource> {
        // The primary where the Sentinels place it at each (re)subscription;
        // a `PUBLISH` there also reaches its replicas, so a subscription on
        // the old primary, demoted, still hears the new one's releases.
        let finder = Arc::clone(&self.finder);
        let resolve: Resolver = Arc::new(move || {
            let finder = Arc::clone(&finder);
            Box::pin(async move {
                let (host, port) = finder.resolve().await?;
                redis::Client::open(connection_info(&host, port, &finder.auth)?)
            })
        });
        Some(PubSubSource::Resolved(resolve))
    }

    fn peek(&self, key: &Arc<str>) -> BoxFuture<Result<Option<Peeked>, RedisError>> {
        let key = Arc::clone(key);
        let primary = self.primary();
        Box::pin(async move { RedisInstance::new(primary.await?).peek(&key).await })
    }

    fn load_scripts(&self) -> BoxFuture<Result<(), RedisError>> {
        let primary = self.primary();
        Box::pin(async move { RedisInstance::new(primary.await?).load_scripts().await })
    }

    fn probe(
        &self,
        epoch_key: &Arc<str>,
        candidate: &Arc<str>,
    ) -> BoxFuture<Result<Probe, RedisError>> {
        let finder = Arc::clone(&self.finder);
        let (epoch_key, candidate) = (Arc::clone(epoch_key), Arc::clone(candidate));
        Box::pin(async move {
            let (mut connection, host, port, token) = finder.follow().await?;
            let current = &finder.current;
            let checked = async {
                let mut ask = redis::pipe();
                ask.cmd("ROLE").cmd("INFO").arg("replication");
                let (role, replication): (Vec<Value>, String) =
                    ask.query_async(&mut connection).await?;
                let primary =
                    matches!(role.first(), Some(Value::BulkString(role)) if role == b"master");
                if !primary {
                    return Err(RedisError::from((
                        ErrorKind::Client,
                        "not a primary",
                        format!("{host}:{port}, where the Sentinels place the primary, is a replica (mid-failover)"),
                    )));
                }
                // A process's `run_id` outlives its terms as primary: a
                // failover and a failback to it between two probes would
                // look like nothing. `master_replid` changes at every
                // promotion and resync.
                let replid = info_field(&replication, "replication", "master_replid")?.to_string();
                let mut probe = RedisInstance::new(connection.clone())
                    .probe(&epoch_key, &candidate)
                    .await?;
                let bare: Arc<str> = probe.run_id.as_str().into();
                probe.run_id = format!("{bare}:{replid}");
                // After the probe's `HSETNX`: the hash exists.
                let mut record = redis::cmd("EVAL");
                record
                    .arg(scripts::RECORD_PRIMARY.code)
                    .arg(1)
                    .arg(&*epoch_key)
                    .arg(&probe.run_id);
                let (since, now): (u64, u64) = record.query_async(&mut connection).await?;
                if since > 0 {
                    probe.changed_ago = Some(Duration::from_millis(now.saturating_sub(since)));
                }
                Ok((probe, bare))
            };
            let answer = checked.await;
            if let Ok((probe, bare)) = &answer {
                let mut current = lock(current);
                if let Some(now) = current
                    .as_mut()
                    .filter(|now| Arc::ptr_eq(&now.token, &token))
                {
                    now.run_id = Some((probe.run_id.as_str().into(), Arc::clone(bare)));
                }
            }
            if let Err(err) = &answer {
                forget_on(current, &host, port, err);
                if err.kind() == ErrorKind::Client {
                    *lock(current) = None;
                }
            }
            answer.map(|(probe, _)| probe)
        })
    }
}

impl Finder {
    /// The connection to the primary where the Sentinels place it now: the
    /// one kept if it goes there, a new one if not.
    async fn follow(&self) -> Result<(MultiplexedConnection, String, u16, Arc<()>), RedisError> {
        let (host, port) = self.resolve().await?;
        let known = lock(&self.current)
            .as_ref()
            .filter(|now| now.host == host && now.port == port)
            .map(|now| (now.connection.clone(), Arc::clone(&now.token)));
        let (connection, token) = match known {
            Some(known) => known,
            None => {
                let connection = connect(&host, port, &self.auth).await?;
                let replicated = match self.replicated {
                    true => Some(connect(&host, port, &self.auth).await?),
                    false => None,
                };
                let token = Arc::new(());
                *lock(&self.current) = Some(Current {
                    host: host.clone(),
                    port,
                    connection: connection.clone(),
                    replicated,
                    run_id: None,
                    token: Arc::clone(&token),
                });
                (connection, token)
            }
        };
        Ok((connection, host, port, token))
    }
}

/// How to reach a data node at `host:port`: with the member's credentials,
/// and NODELAY.
fn connection_info(
    host: &str,
    port: u16,
    (username, password): &(Option<String>, Option<String>),
) -> Result<redis::ConnectionInfo, RedisError> {
    let mut redis = redis::RedisConnectionInfo::default();
    if let Some(username) = username {
        redis = redis.set_username(username);
    }
    if let Some(password) = password {
        redis = redis.set_password(password);
    }
    Ok(redis::ConnectionAddr::Tcp(host.to_string(), port)
        .into_connection_info()?
        .set_redis_settings(redis)
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true)))
}

/// A connection to the primary at `host:port`, with NODELAY; redis-rs's
/// response timeout off (the locker bounds every call).
async fn connect(
    host: &str,
    port: u16,
    (username, password): &(Option<String>, Option<String>),
) -> Result<MultiplexedConnection, RedisError> {
    let client = redis::Client::open(connection_info(
        host,
        port,
        &(username.clone(), password.clone()),
    )?)?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(None);
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}
