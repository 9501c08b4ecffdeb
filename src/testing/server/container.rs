//! Docker fallback: `redis:7-alpine` through testcontainers, used only when
//! `redis-server` is not installed.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::thread;

use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::SyncRunner;
use testcontainers::{Container, GenericImage, ImageExt};

use super::builder::RedisServerBuilder;
use super::ports::free_port;
use super::ready::{answers_ping, poll_until};
use crate::testing::{HarnessError, INSTALL_ADVICE};

const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A Redis container whose port 6379 is published on a fixed host port, so that a
/// restarted container comes back on the same port.
pub(super) struct RedisContainer {
    /// `None` only while being dropped.
    container: Option<Container<GenericImage>>,
}

impl RedisContainer {
    pub(super) fn start(config: &RedisServerBuilder) -> Result<(u16, Self), HarnessError> {
        let port = free_port()?;
        let mut cmd = ["redis-server", "--save", "", "--appendonly", "no"]
            .map(String::from)
            .to_vec();
        cmd.extend(
            config
                .args
                .iter()
                .map(|arg| arg.to_string_lossy().into_owned()),
        );
        let mut request = GenericImage::new("redis", "7-alpine")
            .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections"))
            .with_mapped_port(port, 6379.tcp())
            .with_cmd(cmd);
        for (key, value) in &config.envs {
            request = request.with_env_var(key.to_string_lossy(), value.to_string_lossy());
        }
        let container = off_runtime(|| request.start()).map_err(|error| {
            HarnessError::Docker(format!(
                "redis-server not found: {INSTALL_ADVICE}; the redis:7-alpine container \
                 fallback failed too: {error}"
            ))
        })?;
        let this = Self {
            container: Some(container),
        };
        this.wait_ready(port)?;
        Ok((port, this))
    }

    pub(super) fn kill(&self) -> Result<(), HarnessError> {
        off_runtime(|| self.get().stop_with_timeout(Some(0))).map_err(docker)
    }

    pub(super) fn restart(&self, port: u16) -> Result<(), HarnessError> {
        off_runtime(|| self.get().start()).map_err(docker)?;
        self.wait_ready(port)
    }

    pub(super) fn pause(&self) -> Result<(), HarnessError> {
        off_runtime(|| poll_once(self.get().pause()))
            .ok_or(HarnessError::Unsupported("pausing a container"))?
            .map_err(docker)
    }

    pub(super) fn resume(&self) -> Result<(), HarnessError> {
        off_runtime(|| poll_once(self.get().unpause()))
            .ok_or(HarnessError::Unsupported("resuming a container"))?
            .map_err(docker)
    }

    pub(super) fn is_running(&self) -> bool {
        off_runtime(|| self.get().is_running()).unwrap_or(false)
    }

    fn wait_ready(&self, port: u16) -> Result<(), HarnessError> {
        poll_until(READY_TIMEOUT, || answers_ping(port).then_some(())).ok_or_else(|| {
            HarnessError::NotReady {
                port,
                reason: format!("container {} did not answer PING", self.get().id()),
                log_tail: "(see `docker logs` for the container)".into(),
            }
        })
    }

    fn get(&self) -> &Container<GenericImage> {
        self.container
            .as_ref()
            .expect("container is only taken in drop")
    }
}

impl Drop for RedisContainer {
    fn drop(&mut self) {
        if let Some(container) = self.container.take() {
            off_runtime(move || drop(container));
        }
    }
}

fn docker(error: testcontainers::TestcontainersError) -> HarnessError {
    HarnessError::Docker(error.to_string())
}

/// The blocking testcontainers API runs its own tokio runtime and panics when called
/// from inside another one (e.g. `#[tokio::test]`), so each call gets a plain thread.
fn off_runtime<T: Send>(call: impl FnOnce() -> T + Send) -> T {
    thread::scope(|scope| scope.spawn(call).join())
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// testcontainers 0.25 declares the blocking container's `pause`/`unpause` as `async`,
/// although their bodies block: the first poll finishes the work. `None` if that changes.
fn poll_once<F: Future>(future: F) -> Option<F::Output> {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => Some(output),
        Poll::Pending => None,
    }
}
