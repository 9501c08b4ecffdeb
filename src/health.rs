//! Health reports: per instance, whether it answers, how fast, which server process
//! it is (`run_id`) and what its clock says.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::join_all;

use crate::epoch::Epoch;
use crate::error::{InstanceVote, Vote};
use crate::monitor::probe::probe_once;
use crate::peer;
use crate::shared::Shared;
use crate::standing::identities::check_identities;
use crate::token;

/// What [`QuorumLocker::health`](crate::QuorumLocker::health) and
/// [`prepare`](crate::QuorumLocker::prepare) found, instance by instance.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::time::Duration;
/// use quorumlock::{MemoryInstance, QuorumLocker};
///
/// let redis = MemoryInstance::new("redis");
/// let locker = QuorumLocker::builder().memory(&redis).build().await?;
/// let health = locker.health().await;
/// assert!(health.has_quorum());
/// println!("{health}");
/// # Ok::<_, quorumlock::Error>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct Health {
    instances: Vec<InstanceHealth>,
    quorum: usize,
}

/// One instance's health.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct InstanceHealth {
    /// The instance's position in the order given to the builder.
    pub index: usize,
    /// Its address (password redacted) or name.
    pub address: Arc<str>,
    /// The round trip of one probe (`INFO server`, `TIME` and the epoch hash's
    /// `HSETNX` and `HMGET`, pipelined) on an open connection.
    pub latency: Option<Duration>,
    /// The server's `run_id`, which changes whenever the server restarts.
    pub run_id: Option<String>,
    /// The server's clock (`TIME`) when it answered.
    pub server_time: Option<SystemTime>,
    /// This process's wall clock when the answer arrived, to compare with
    /// `server_time`.
    pub local_time: Option<SystemTime>,
    /// Why it is unreachable: `Failed` or `TimedOut`. `None` when it answered.
    pub error: Option<Vote>,
    /// How fast its clock runs against this process's monotonic clock (1.0 is
    /// exact; 2.0 expires keys in half the time), estimated from the probes of the
    /// last few seconds; `None` until they span long enough.
    pub clock_rate: Option<f64>,
    /// How long it stays out of acquisitions after it lost its keys (a restart,
    /// a flush, a failover), if it did.
    pub quarantined_for: Option<Duration>,
}

impl InstanceHealth {
    /// Whether it answered.
    pub fn is_reachable(&self) -> bool {
        self.error.is_none()
    }

    /// Its clock minus ours when it answered, in milliseconds (with up to half a
    /// round trip of noise); `None` when it did not answer.
    pub fn clock_offset_ms(&self) -> Option<f64> {
        let server = self.server_time?;
        let local = self.local_time?;
        Some(match server.duration_since(local) {
            Ok(ahead) => ahead.as_secs_f64() * 1e3,
            Err(behind) => -behind.duration().as_secs_f64() * 1e3,
        })
    }
}

impl Health {
    /// Every instance, in order.
    pub fn instances(&self) -> &[InstanceHealth] {
        &self.instances
    }

    /// How many instances answered.
    pub fn reachable(&self) -> usize {
        self.instances
            .iter()
            .filter(|instance| instance.is_reachable())
            .count()
    }

    /// The locker's quorum.
    pub fn quorum(&self) -> usize {
        self.quorum
    }

    /// Whether enough instances answered for a lock to be granted.
    pub fn has_quorum(&self) -> bool {
        self.reachable() >= self.quorum
    }

    /// The first two instances that are the same server process (same `run_id`)
    /// under different addresses, such as `localhost` and `127.0.0.1`: its vote
    /// would count twice.
    pub fn same_server(&self) -> Option<(usize, usize)> {
        self.instances.iter().enumerate().find_map(|(i, first)| {
            let run_id = first.run_id.as_ref()?;
            self.instances[i + 1..]
                .iter()
                .find(|second| second.run_id.as_ref() == Some(run_id))
                .map(|second| (first.index, second.index))
        })
    }

    /// Each instance's state as a vote, for errors.
    pub(crate) fn votes(&self) -> Vec<InstanceVote> {
        self.instances
            .iter()
            .map(|instance| InstanceVote {
                index: instance.index,
                address: Arc::clone(&instance.address),
                vote: instance.error.clone().unwrap_or(Vote::Granted),
            })
            .collect()
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} of {} instance(s) reachable, quorum {}",
            self.reachable(),
            self.instances.len(),
            self.quorum
        )?;
        for instance in &self.instances {
            write!(f, "instance {} ({}): ", instance.index, instance.address)?;
            match (&instance.error, instance.latency) {
                (Some(error), _) => writeln!(f, "{error}")?,
                (None, latency) => {
                    write!(f, "ok")?;
                    if let Some(latency) = latency {
                        write!(f, ", {:.2} ms", latency.as_secs_f64() * 1e3)?;
                    }
                    if let Some(run_id) = &instance.run_id {
                        write!(f, ", run_id {}…", token::abbreviate(run_id))?;
                    }
                    if let Some(offset) = instance.clock_offset_ms() {
                        write!(f, ", clock {offset:+.1} ms from ours")?;
                    }
                    if let Some(rate) = instance.clock_rate {
                        write!(f, ", clock rate {rate:.4}")?;
                    }
                    if let Some(left) = instance.quarantined_for {
                        write!(f, ", quarantined for {left:?} after losing its keys (restart, flush or failover)")?;
                    }
                    writeln!(f)?;
                }
            }
        }
        Ok(())
    }
}

/// Checks every instance in parallel. With `load_scripts`, loads the Lua scripts
/// first; without, sends one unmeasured probe first. Either way the connection is open before
/// the measured probe, so the latency is a round trip, not a connect.
pub(crate) async fn check(shared: &Shared, timeout: Duration, load_scripts: bool) -> Health {
    let checks = shared.members.iter().map(|member| async move {
        let mut health = InstanceHealth {
            index: member.index,
            address: Arc::clone(&member.address),
            latency: None,
            run_id: None,
            server_time: None,
            local_time: None,
            error: None,
            clock_rate: None,
            quarantined_for: None,
        };
        let probe = async {
            if load_scripts {
                if let Err(err) = member.instance.load_scripts().await {
                    member.state.failed(&err);
                    return Err(err);
                }
            } else {
                // A connection broken by a server restart fails once and then
                // reconnects: only the measured probe decides.
                // Its failure still counts: it may be the broken connection to
                // a server that restarted. A peer that is not what its URL
                // says fails the same way every time: no second probe.
                if let Err(err) = member
                    .instance
                    .probe(&shared.settings.epoch_key, &Epoch::generate()?)
                    .await
                {
                    member.state.failed(&err);
                    if peer::is_explained(&err) {
                        return Err(err);
                    }
                }
            }
            probe_once(shared, member).await
        };
        match tokio::time::timeout(timeout, probe).await {
            Ok(Ok((probe, latency))) => {
                health.latency = Some(latency);
                health.run_id = Some(probe.run_id);
                health.server_time = SystemTime::UNIX_EPOCH.checked_add(probe.server_time);
                health.local_time = Some(SystemTime::now());
            }
            Ok(Err(err)) => health.error = Some(Vote::Failed(err)),
            Err(_) => health.error = Some(Vote::TimedOut(timeout)),
        }
        health.clock_rate = member.state.clock_rate();
        health.quarantined_for = member.state.quarantine_left(shared.restart_quarantine());
        health
    });
    let instances = join_all(checks).await;
    check_identities(&shared.members);
    Health {
        instances,
        quorum: shared.quorum,
    }
}
