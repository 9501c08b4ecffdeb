//! One Redis server on a loopback port, with fault controls.
//!
//! Here, the fixture and its controls; in `builder`, its settings; in
//! `process` and `container`, the two ways a server runs; in `ports` and
//! `ready`, how a server is given a port and known to be up.

mod builder;
#[cfg(feature = "testcontainers")]
mod container;
mod ports;
mod process;
mod ready;

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

pub use self::builder::RedisServerBuilder;
use self::ports::Ports;
pub(super) use self::process::spawn_child;
use self::process::{Launch, Process};
use self::ready::answers_ping;
pub(super) use self::ready::poll_until;
use super::clock::{self, ClockSetting};
use super::HarnessError;

/// Fresh ports tried before giving up. A clash needs another process to bind the port
/// between our probe and the server's own bind, so a few retries are plenty.
const START_ATTEMPTS: usize = 20;
/// How long `restart_empty` keeps trying to rebind a port that is briefly still in use.
const REBIND_TIMEOUT: Duration = Duration::from_secs(5);

// Here rather than in `builder`: the settings then depend on nothing of the
// fixture, and `process` and `container` read them without an import loop.
impl RedisServerBuilder {
    /// Starts a server with these settings and waits until it answers `PING`.
    pub fn start(&self) -> Result<RedisServer, HarnessError> {
        if let Some(setting) = self.clock {
            setting.validate()?;
        }
        match super::redis_server_bin() {
            Some(bin) => {
                if self.clock.is_some() {
                    // Once, here, rather than in every retried launch.
                    clock::shim()?;
                }
                RedisServer::start_process(bin, self.clone())
            }
            None => RedisServer::start_without_binary(self),
        }
    }
}

/// A Redis server for tests on `127.0.0.1`, killed and reaped when dropped.
///
/// Persistence is off, so a killed server loses its keys, like a real crash without AOF.
pub struct RedisServer {
    /// The plain port, and the TLS and cluster bus ports of servers that have them.
    ports: Ports,
    paused: bool,
    backend: Backend,
}

enum Backend {
    Process {
        bin: PathBuf,
        /// Boxed: the settings are many, and read only at (re)starts.
        config: Box<RedisServerBuilder>,
        /// `None` once killed.
        run: Option<Process>,
    },
    #[cfg(feature = "testcontainers")]
    Container(Box<container::RedisContainer>),
}

impl RedisServer {
    /// Starts a server with default settings; see [`builder`](Self::builder) for more.
    pub fn start() -> Result<Self, HarnessError> {
        RedisServerBuilder::default().start()
    }

    /// Settings for a server with extra arguments or environment:
    ///
    /// ```
    /// # fn main() -> Result<(), quorumlock::testing::HarnessError> {
    /// let server = quorumlock::testing::RedisServer::builder()
    ///     .arg("--requirepass")
    ///     .arg("secret")
    ///     .start()?;
    /// # drop(server);
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder() -> RedisServerBuilder {
        RedisServerBuilder::default()
    }

    fn start_process(bin: PathBuf, config: RedisServerBuilder) -> Result<Self, HarnessError> {
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let Some(ports) = Ports::pick(config.tls.is_some(), config.cluster.is_some())? else {
                continue;
            };
            match Process::launch(&bin, &config, ports)? {
                Launch::Ready(run) => {
                    return Ok(Self {
                        ports,
                        paused: false,
                        backend: Backend::Process {
                            bin,
                            config: Box::new(config),
                            run: Some(run),
                        },
                    })
                }
                // Most likely someone else bound a port first: try others.
                Launch::Exited(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("no usable free port").into()))
    }

    #[cfg(feature = "testcontainers")]
    fn start_without_binary(config: &RedisServerBuilder) -> Result<Self, HarnessError> {
        if config.clock.is_some() {
            // The shim is built for this host's libc, not the image's.
            return Err(HarnessError::Unsupported(
                "the clock shim (it needs a local redis-server)",
            ));
        }
        if config.tls.is_some() {
            return Err(HarnessError::Unsupported(
                "a TLS server (it needs a local redis-server)",
            ));
        }
        if config.cluster.is_some() || config.config_file.is_some() {
            return Err(HarnessError::Unsupported(
                "a Redis Cluster node or a configuration file (they need a local redis-server)",
            ));
        }
        let (port, container) = container::RedisContainer::start(config)?;
        Ok(Self {
            ports: Ports {
                plain: port,
                tls: None,
                cluster_bus: None,
            },
            paused: false,
            backend: Backend::Container(Box::new(container)),
        })
    }

    #[cfg(not(feature = "testcontainers"))]
    fn start_without_binary(_config: &RedisServerBuilder) -> Result<Self, HarnessError> {
        Err(HarnessError::NotInstalled)
    }

    /// The TCP port, stable across [`restart_empty`](Self::restart_empty).
    pub fn port(&self) -> u16 {
        self.ports.plain
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.ports.plain))
    }

    /// `redis://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.ports.plain)
    }

    /// The TLS port of a server started with [`RedisServerBuilder::tls`],
    /// stable across [`restart_empty`](Self::restart_empty).
    pub fn tls_port(&self) -> Option<u16> {
        self.ports.tls
    }

    /// `rediss://127.0.0.1:tls_port`, for a server started with
    /// [`RedisServerBuilder::tls`].
    pub fn tls_url(&self) -> Option<String> {
        self.ports
            .tls
            .map(|port| format!("rediss://127.0.0.1:{port}"))
    }

    /// The cluster bus port of a node of a [`ShardedCluster`](crate::testing::ShardedCluster)
    /// (`--cluster-port`), stable across [`restart_empty`](Self::restart_empty); `None`
    /// for a server outside a Redis Cluster.
    pub fn cluster_bus_port(&self) -> Option<u16> {
        self.ports.cluster_bus
    }

    /// The server's process id; `None` once killed, or when it runs in a container.
    pub fn pid(&self) -> Option<u32> {
        match &self.backend {
            Backend::Process { run, .. } => run.as_ref().map(Process::pid),
            #[cfg(feature = "testcontainers")]
            Backend::Container(_) => None,
        }
    }

    /// The running server process's log: Redis's own log plus its stdout and stderr.
    /// `None` once killed (the file is deleted with it), or when it runs in a container.
    pub fn log_path(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Process { run, .. } => run.as_ref().map(Process::log),
            #[cfg(feature = "testcontainers")]
            Backend::Container(_) => None,
        }
    }

    /// Whether the server exists: not killed and not exited. A paused server is running.
    pub fn is_running(&self) -> bool {
        match &self.backend {
            Backend::Process { run, .. } => run.as_ref().is_some_and(|run| !run.has_exited()),
            #[cfg(feature = "testcontainers")]
            Backend::Container(container) => container.is_running(),
        }
    }

    /// Whether [`pause`](Self::pause) was called without a later resume, kill or restart.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Kills the server at once (`SIGKILL`, no shutdown) and reaps it; its keys are lost
    /// and its port refuses connections. Killing a killed server does nothing.
    pub fn kill(&mut self) -> Result<(), HarnessError> {
        let killed = match &mut self.backend {
            Backend::Process { run, .. } => match run.take() {
                Some(mut run) => run.kill(),
                None => Ok(()),
            },
            #[cfg(feature = "testcontainers")]
            Backend::Container(container) => {
                // Unlike a stopped process, a paused container may refuse to stop.
                if self.paused {
                    container.resume()?;
                }
                container.kill()
            }
        };
        self.paused = false;
        killed
    }

    /// Freezes the server (`SIGSTOP`): the kernel still accepts connections but nothing is
    /// answered, like a server stalled by its host or cut off by a network partition.
    pub fn pause(&mut self) -> Result<(), HarnessError> {
        match &self.backend {
            Backend::Process { run, .. } => self.running(run)?.signal(libc::SIGSTOP, "SIGSTOP")?,
            #[cfg(feature = "testcontainers")]
            Backend::Container(container) => container.pause()?,
        }
        self.paused = true;
        Ok(())
    }

    /// Unfreezes a paused server (`SIGCONT`); requests queued meanwhile are then served.
    pub fn resume(&mut self) -> Result<(), HarnessError> {
        match &self.backend {
            Backend::Process { run, .. } => self.running(run)?.signal(libc::SIGCONT, "SIGCONT")?,
            #[cfg(feature = "testcontainers")]
            Backend::Container(container) => container.resume()?,
        }
        self.paused = false;
        Ok(())
    }

    /// Kills the server if it runs, then starts a fresh, empty one on the same port with
    /// the same arguments, environment and clock setting, and waits until it answers
    /// `PING`.
    pub fn restart_empty(&mut self) -> Result<(), HarnessError> {
        self.kill()?;
        let ports = self.ports;
        match &mut self.backend {
            Backend::Process { bin, config, run } => {
                let mut last_error = None;
                // The old socket is normally gone once the process is reaped; retrying
                // covers slow teardown, and reports a port taken by someone else.
                let restarted = poll_until(REBIND_TIMEOUT, || {
                    match Process::launch(bin, config, ports) {
                        Ok(Launch::Ready(new)) => Some(Ok(new)),
                        Ok(Launch::Exited(error)) => {
                            last_error = Some(error);
                            None
                        }
                        Err(error) => Some(Err(error)),
                    }
                });
                let new = match restarted {
                    Some(result) => result?,
                    None => {
                        return Err(last_error
                            .unwrap_or_else(|| io::Error::other("could not rebind").into()))
                    }
                };
                *run = Some(new);
                Ok(())
            }
            #[cfg(feature = "testcontainers")]
            Backend::Container(container) => container.restart(ports.plain),
        }
    }

    /// The rate of the server's clocks, if it runs with the clock shim; see
    /// [`RedisServerBuilder::clock_rate`]. A killed server reports the rate it will
    /// restart with.
    pub fn clock_rate(&self) -> Option<f64> {
        self.clock_setting().map(|setting| setting.rate)
    }

    /// The shift of the server's wall clocks in milliseconds, if it runs with the clock
    /// shim; see [`RedisServerBuilder::clock_offset_ms`].
    pub fn clock_offset_ms(&self) -> Option<i64> {
        self.clock_setting().map(|setting| setting.offset_ms)
    }

    /// Changes the rate of the server's clocks; see [`RedisServerBuilder::clock_rate`].
    ///
    /// The clocks continue from their current values at the new rate, so they never jump
    /// back. When this returns the server runs at the new rate: the shim looks for
    /// changes at most every 10 ms, so this waits a little over that and then sends a
    /// `PING`, which makes the server read its clock. Exceptions: a paused server takes
    /// the change when resumed, and a killed one restarts at the new rate.
    ///
    /// # Errors
    ///
    /// [`HarnessError::NoClockShim`] if the server was started without
    /// [`clock_rate`](RedisServerBuilder::clock_rate) or
    /// [`clock_offset_ms`](RedisServerBuilder::clock_offset_ms);
    /// [`HarnessError::InvalidClockRate`] unless `rate` is finite and within
    /// `0.001..=1000` (the rate is then unchanged); [`HarnessError::Io`] if the control
    /// file cannot be written.
    pub fn set_clock_rate(&mut self, rate: f64) -> Result<(), HarnessError> {
        self.change_clock(|setting| ClockSetting { rate, ..setting })
    }

    /// Changes the shift of the server's wall clocks: the wall clock steps by the
    /// difference at once, forwards or backwards; see
    /// [`RedisServerBuilder::clock_offset_ms`].
    ///
    /// # Errors
    ///
    /// As for [`set_clock_rate`](Self::set_clock_rate), with
    /// [`HarnessError::InvalidClockOffset`] beyond ±10^12 ms.
    pub fn set_clock_offset_ms(&mut self, offset_ms: i64) -> Result<(), HarnessError> {
        self.change_clock(|setting| ClockSetting {
            offset_ms,
            ..setting
        })
    }

    fn clock_setting(&self) -> Option<ClockSetting> {
        match &self.backend {
            Backend::Process { config, .. } => config.clock,
            #[cfg(feature = "testcontainers")]
            Backend::Container(_) => None,
        }
    }

    fn change_clock(
        &mut self,
        change: impl FnOnce(ClockSetting) -> ClockSetting,
    ) -> Result<(), HarnessError> {
        let port = self.ports.plain;
        let (config, run) = match &mut self.backend {
            Backend::Process { config, run, .. } => (config, run),
            #[cfg(feature = "testcontainers")]
            Backend::Container(_) => return Err(HarnessError::NoClockShim { port }),
        };
        let Some(current) = config.clock else {
            return Err(HarnessError::NoClockShim { port });
        };
        let new = change(current).validate()?;
        let control = run.as_ref().and_then(Process::clock_control);
        if let Some(control) = control {
            clock::write_control(control, new)?;
        }
        config.clock = Some(new);
        if control.is_some() && !self.paused {
            // Any poll by the shim after the write sees it, and one is due by now.
            thread::sleep(clock::ADOPT_AFTER);
            // Best effort: a server that does not answer takes it at its next command.
            answers_ping(port);
        }
        Ok(())
    }

    /// The running server's clock control file, for tests that write it themselves.
    #[cfg(test)]
    pub(super) fn clock_control_path(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Process { run, .. } => run.as_ref()?.clock_control(),
            #[cfg(feature = "testcontainers")]
            Backend::Container(_) => None,
        }
    }

    fn running<'a>(&self, run: &'a Option<Process>) -> Result<&'a Process, HarnessError> {
        run.as_ref().ok_or(HarnessError::NotRunning {
            port: self.ports.plain,
        })
    }
}

impl fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisServer")
            .field("url", &self.url())
            .field("tls_url", &self.tls_url())
            .field("cluster_bus_port", &self.cluster_bus_port())
            .field("pid", &self.pid())
            .field("paused", &self.paused)
            .field("clock_rate", &self.clock_rate())
            .finish()
    }
}
