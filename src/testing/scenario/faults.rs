//! How a run puts its servers through its [`Fault`]: what is done before the
//! clients start and undone after, what acts while they run, and the blocking
//! server control both go through. Apart from the run, which only calls them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::{join_error, lock, Fault, Scenario};
use crate::testing::cluster::RedisCluster;
use crate::testing::proxy::{Direction, FaultProxy};
use crate::testing::HarnessError;

impl Scenario {
    pub(super) async fn apply_static_fault(
        &self,
        cluster: &Arc<Mutex<RedisCluster>>,
        proxies: &[Arc<FaultProxy>],
    ) -> Result<(), HarnessError> {
        match &self.fault {
            Fault::Kill(on) => control(cluster, on.clone(), |c, i| c.kill(i)).await,
            Fault::Pause(on) => control(cluster, on.clone(), |c, i| c.pause(i)).await,
            Fault::ClockRate { on, rate } | Fault::ClockSteps { on, rate, .. } => {
                let rate = *rate;
                control(cluster, on.clone(), move |c, i| c.set_clock_rate(i, rate)).await
            }
            Fault::Latency {
                latency, jitter, ..
            } => {
                for proxy in proxies {
                    proxy.set_latency(Direction::Both, *latency / 2);
                    proxy.set_jitter(Direction::Both, *jitter / 2);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    pub(super) async fn undo_static_fault(
        &self,
        cluster: &Arc<Mutex<RedisCluster>>,
    ) -> Result<(), HarnessError> {
        match &self.fault {
            Fault::Pause(on) => control(cluster, on.clone(), |c, i| c.resume(i)).await,
            _ => Ok(()),
        }
    }

    /// Starts the fault that acts while the clients run, if any.
    pub(super) fn spawn_dynamic_fault(
        &self,
        cluster: &Arc<Mutex<RedisCluster>>,
        proxies: &[Arc<FaultProxy>],
        deadline: Instant,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let cluster = Arc::clone(cluster);
        match self.fault.clone() {
            Fault::ClockSteps {
                on, step_ms, every, ..
            } => Some(tokio::spawn(async move {
                let mut offset_ms = 0i64;
                while Instant::now() + every < deadline {
                    tokio::time::sleep(every).await;
                    offset_ms -= step_ms;
                    let _ = control(&cluster, on.clone(), move |c, i| {
                        c.set_clock_offset_ms(i, offset_ms)
                    })
                    .await;
                }
            })),
            Fault::RestartEmpty { on, every } => Some(tokio::spawn(async move {
                while Instant::now() + every < deadline {
                    tokio::time::sleep(every).await;
                    let _ = control(&cluster, vec![on], |c, i| c.restart_empty(i)).await;
                }
            })),
            Fault::Spikes { spike, every, .. }
            | Fault::Partition {
                cut: spike, every, ..
            } => {
                let partition = matches!(self.fault, Fault::Partition { .. });
                let proxies: Vec<Arc<FaultProxy>> = proxies.to_vec();
                Some(tokio::spawn(async move {
                    while Instant::now() + every < deadline {
                        tokio::time::sleep(every.saturating_sub(spike)).await;
                        for proxy in &proxies {
                            if partition {
                                proxy.cut();
                            } else {
                                proxy.set_latency(Direction::Both, spike);
                            }
                        }
                        tokio::time::sleep(spike).await;
                        for proxy in &proxies {
                            proxy.heal();
                            proxy.set_latency(Direction::Both, Duration::ZERO);
                        }
                    }
                }))
            }
            _ => None,
        }
    }
}

/// Runs blocking server control on a blocking thread.
async fn control(
    cluster: &Arc<Mutex<RedisCluster>>,
    on: Vec<usize>,
    action: impl Fn(&mut RedisCluster, usize) -> Result<(), HarnessError> + Send + 'static,
) -> Result<(), HarnessError> {
    let cluster = Arc::clone(cluster);
    tokio::task::spawn_blocking(move || {
        let mut cluster = lock(&cluster);
        on.into_iter().try_for_each(|i| action(&mut cluster, i))
    })
    .await
    .map_err(join_error)?
}
