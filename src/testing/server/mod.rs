//! One Redis server on a loopback port, with fault controls.

use std::ffi::OsString;
use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::clock::{self, ClockSetting};
use super::HarnessError;

/// Fresh ports tried before giving up. A clash needs another process to bind the port
/// between our probe and the server's own bind, so a few retries are plenty.
const START_ATTEMPTS: usize = 20;
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `restart_empty` keeps trying to rebind a port that is briefly still in use.
const REBIND_TIMEOUT: Duration = Duration::from_secs(5);
const PING_TIMEOUT: Duration = Duration::from_millis(200);
const MAX_POLL_PAUSE: Duration = Duration::from_millis(50);
/// The default Redis port may belong to a real server on the developer's machine.
const DEFAULT_REDIS_PORT: u16 = 6379;
const LOG_FILE: &str = "redis.log";
const LOG_TAIL_LINES: usize = 30;

/// Extra arguments, environment and clock for a [`RedisServer`]; see
/// [`RedisServer::builder`].
///
/// The settings are kept by the server and re-applied by [`RedisServer::restart_empty`].
#[derive(Debug, Clone, Default)]
pub struct RedisServerBuilder {
    pub(super) args: Vec<OsString>,
    pub(super) envs: Vec<(OsString, OsString)>,
    /// `None`: no shim, the server reads the real clocks.
    pub(super) clock: Option<ClockSetting>,
    /// `Some`: a TLS port beside the plain one. Boxed: most servers have none.
    pub(super) tls: Option<Box<TlsFiles>>,
}

/// The PEM files a TLS server runs with; see [`RedisServerBuilder::tls`].
#[derive(Debug, Clone)]
pub(super) struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

impl RedisServerBuilder {
    /// Appends a `redis-server` argument, e.g. `--requirepass`.
    ///
    /// Arguments follow the fixture's own, so they override its defaults (`--save`,
    /// `--appendonly`); do not change `--port`, `--bind`, `--dir` or `--logfile`.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Appends several `redis-server` arguments; see [`arg`](Self::arg).
    pub fn args<I>(mut self, args: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for the server process, e.g. `LD_PRELOAD`.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Runs the server's clocks `rate` times as fast as real time, through an
    /// `LD_PRELOAD` shim of this crate's: at 2.0 a key set with `PX 2000` expires after
    /// about one real second, and `TIME` advances two seconds per real second. The rate
    /// can be changed while the server runs with [`RedisServer::set_clock_rate`].
    ///
    /// A server needs the shim from the start to have its clock changed later, so
    /// `clock_rate(1.0)` is how to start a server at the normal rate that may drift
    /// later; without it the server reads the real clocks, at no cost.
    ///
    /// What the shim changes, and what it does not:
    ///
    /// - Wall clocks (`gettimeofday`, `time`, `CLOCK_REALTIME`: key expiry, `TIME`) and
    ///   monotonic clocks (`CLOCK_MONOTONIC`, `CLOCK_BOOTTIME`: Redis's timers) are
    ///   scaled, each continuing from its value at the last change, so neither jumps.
    ///   CPU-time clocks are not.
    /// - Waiting is real: Redis computes its timer deadlines (the `hz` cron, active
    ///   expiry, blocking-command timeouts) on the scaled clocks but sleeps in real
    ///   time, so its background work runs at a somewhat different pace; commands answer
    ///   as usual.
    /// - A restart ([`RedisServer::restart_empty`]) keeps the shim and the current rate
    ///   and offset; the new process's clocks start from the real time (plus the
    ///   offset).
    ///
    /// The shim is compiled from C the first time a process needs it, with `cc` (or
    /// `gcc`), into `$TMPDIR/quorumlock-clock-shim-<uid>/`, and reused after that. It
    /// needs Linux and a local `redis-server`: not the Docker fallback.
    ///
    /// # Errors
    ///
    /// [`start`](Self::start) fails with [`HarnessError::InvalidClockRate`] unless `rate`
    /// is finite and within `0.001..=1000`, with [`HarnessError::ClockShim`] when the
    /// shim cannot be built (no C compiler, say), and with [`HarnessError::Unsupported`]
    /// on the Docker fallback.
    ///
    /// # Example
    ///
    /// ```
    /// # fn main() -> Result<(), quorumlock::testing::HarnessError> {
    /// use quorumlock::testing::RedisServer;
    ///
    /// let mut server = RedisServer::builder().clock_rate(2.0).start()?;
    /// assert_eq!(server.clock_rate(), Some(2.0));
    /// server.set_clock_rate(0.5)?; // now half as fast, continuing from where it was
    /// # Ok(())
    /// # }
    /// ```
    pub fn clock_rate(mut self, rate: f64) -> Self {
        self.clock.get_or_insert_with(ClockSetting::default).rate = rate;
        self
    }

    /// Shifts the server's wall clocks by `offset_ms` milliseconds (negative: behind),
    /// through the same shim as [`clock_rate`](Self::clock_rate) (at rate 1.0 unless set).
    /// The monotonic clocks are not shifted.
    ///
    /// Changed while running with [`RedisServer::set_clock_offset_ms`], it steps the
    /// wall clock like an NTP correction: a forward step expires keys early.
    ///
    /// # Errors
    ///
    /// [`start`](Self::start) fails with [`HarnessError::InvalidClockOffset`] beyond
    /// ±10^12 ms, and otherwise as for [`clock_rate`](Self::clock_rate).
    pub fn clock_offset_ms(mut self, offset_ms: i64) -> Self {
        self.clock
            .get_or_insert_with(ClockSetting::default)
            .offset_ms = offset_ms;
        self
    }

    /// Also serves TLS, on a port of its own ([`RedisServer::tls_port`],
    /// [`RedisServer::tls_url`]), with this certificate and key (PEM files)
    /// and this CA for client certificates (`--tls-cert-file`,
    /// `--tls-key-file`, `--tls-ca-cert-file`).
    ///
    /// Redis then asks clients for a certificate signed by the CA (its
    /// `tls-auth-clients` defaults to `yes`); add `.arg("--tls-auth-clients").arg("no")`
    /// for servers that do not. The plain port stays open: the fixture checks
    /// readiness on it, and [`RedisCluster::connection`](super::RedisCluster::connection)
    /// and [`keys`](super::RedisCluster::keys) inspect keys through it, so that
    /// only the locker under test speaks TLS. The server's certificate must
    /// name `127.0.0.1` (or `localhost`, for URLs that use it).
    ///
    /// # Errors
    ///
    /// [`start`](Self::start) fails with [`HarnessError::NotReady`] when Redis
    /// refuses the files (its log tail says why, e.g. a key that is not the
    /// certificate's) or was built without TLS, and with
    /// [`HarnessError::Unsupported`] on the Docker fallback.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # fn main() -> Result<(), quorumlock::testing::HarnessError> {
    /// use quorumlock::testing::RedisServer;
    ///
    /// let server = RedisServer::builder()
    ///     .tls("tests/tls/server.crt", "tests/tls/server.key", "tests/tls/ca.crt")
    ///     .arg("--tls-auth-clients")
    ///     .arg("no")
    ///     .start()?;
    /// let url = server.tls_url().expect("started with tls"); // rediss://127.0.0.1:PORT
    /// # drop(url);
    /// # Ok(())
    /// # }
    /// ```
    pub fn tls(
        mut self,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
        ca: impl Into<PathBuf>,
    ) -> Self {
        self.tls = Some(Box::new(TlsFiles {
            cert: cert.into(),
            key: key.into(),
            ca: ca.into(),
        }));
        self
    }

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
    port: u16,
    /// The TLS port, for servers started with [`RedisServerBuilder::tls`].
    tls_port: Option<u16>,
    paused: bool,
    backend: Backend,
}

enum Backend {
    Process {
        bin: PathBuf,
        config: RedisServerBuilder,
        /// `None` once killed.
        run: Option<Process>,
    },
    #[cfg(feature = "testcontainers")]
    Container(Box<super::container::RedisContainer>),
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
            let port = free_port()?;
            let tls_port = match config.tls {
                Some(_) => Some(free_port()?),
                None => None,
            };
            if port == DEFAULT_REDIS_PORT
                || tls_port.is_some_and(|tls| tls == DEFAULT_REDIS_PORT || tls == port)
            {
                continue;
            }
            match Process::launch(&bin, &config, port, tls_port)? {
                Launch::Ready(run) => {
                    return Ok(Self {
                        port,
                        tls_port,
                        paused: false,
                        backend: Backend::Process {
                            bin,
                            config,
                            run: Some(run),
                        },
                    })
                }
                // Most likely someone else bound the port first: try another one.
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
        let (port, container) = super::container::RedisContainer::start(config)?;
        Ok(Self {
            port,
            tls_port: None,
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
        self.port
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// `redis://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The TLS port of a server started with [`RedisServerBuilder::tls`],
    /// stable across [`restart_empty`](Self::restart_empty).
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// `rediss://127.0.0.1:tls_port`, for a server started with
    /// [`RedisServerBuilder::tls`].
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port
            .map(|port| format!("rediss://127.0.0.1:{port}"))
    }

    /// The server's process id; `None` once killed, or when it runs in a container.
    pub fn pid(&self) -> Option<u32> {
        match &self.backend {
            Backend::Process { run, .. } => run.as_ref().map(|run| run.child.id()),
            #[cfg(feature = "testcontainers")]
            Backend::Container(_) => None,
        }
    }

    /// The running server process's log: Redis's own log plus its stdout and stderr.
    /// `None` once killed (the file is deleted with it), or when it runs in a container.
    pub fn log_path(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Process { run, .. } => run.as_ref().map(|run| run.log.as_path()),
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
        let (port, tls_port) = (self.port, self.tls_port);
        match &mut self.backend {
            Backend::Process { bin, config, run } => {
                let mut last_error = None;
                // The old socket is normally gone once the process is reaped; retrying
                // covers slow teardown, and reports a port taken by someone else.
                let restarted = poll_until(REBIND_TIMEOUT, || {
                    match Process::launch(bin, config, port, tls_port) {
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
            Backend::Container(container) => container.restart(port),
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
        let port = self.port;
        let (config, run) = match &mut self.backend {
            Backend::Process { config, run, .. } => (config, run),
            #[cfg(feature = "testcontainers")]
            Backend::Container(_) => return Err(HarnessError::NoClockShim { port }),
        };
        let Some(current) = config.clock else {
            return Err(HarnessError::NoClockShim { port });
        };
        let new = change(current).validate()?;
        let control = run.as_ref().and_then(|run| run.clock_control.as_deref());
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
            Backend::Process { run, .. } => run.as_ref()?.clock_control.as_deref(),
            #[cfg(feature = "testcontainers")]
            Backend::Container(_) => None,
        }
    }

    fn running<'a>(&self, run: &'a Option<Process>) -> Result<&'a Process, HarnessError> {
        run.as_ref()
            .ok_or(HarnessError::NotRunning { port: self.port })
    }
}

impl fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisServer")
            .field("url", &self.url())
            .field("tls_url", &self.tls_url())
            .field("pid", &self.pid())
            .field("paused", &self.paused)
            .field("clock_rate", &self.clock_rate())
            .finish()
    }
}

/// A running `redis-server` child and its private directory, killed and reaped on drop.
struct Process {
    child: Child,
    log: PathBuf,
    /// The clock shim's control file, when the server runs with it.
    clock_control: Option<PathBuf>,
    /// Removed after the child is dead (fields drop after `Drop::drop`).
    _dir: TempDir,
}

enum Launch {
    Ready(Process),
    /// The server exited during startup; retrying on another port may help.
    Exited(HarnessError),
}

impl Process {
    fn launch(
        bin: &Path,
        config: &RedisServerBuilder,
        port: u16,
        tls_port: Option<u16>,
    ) -> Result<Launch, HarnessError> {
        let dir = tempfile::Builder::new()
            .prefix("quorumlock-redis-")
            .tempdir()?;
        let log_path = dir.path().join(LOG_FILE);
        // Argument errors go to stderr before the log file is opened: appending both to
        // one file gives a single log to quote when startup fails.
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let (clock_control, clock_env) = match config.clock {
            Some(setting) => {
                let (control, env) = clock::launch_env(dir.path(), setting, &config.envs)?;
                (Some(control), env)
            }
            None => (None, Vec::new()),
        };
        let mut command = Command::new(bin);
        command
            .arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(&log_path);
        if let (Some(files), Some(tls_port)) = (&config.tls, tls_port) {
            command
                .arg("--tls-port")
                .arg(tls_port.to_string())
                .arg("--tls-cert-file")
                .arg(&files.cert)
                .arg("--tls-key-file")
                .arg(&files.key)
                .arg("--tls-ca-cert-file")
                .arg(&files.ca);
        }
        command
            .args(&config.args)
            .envs(config.envs.iter().map(|(key, value)| (key, value)))
            // After the caller's: the shim's LD_PRELOAD already includes theirs.
            .envs(clock_env)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_parent(&mut command);
        let child = spawn(command).map_err(|source| HarnessError::Spawn {
            bin: bin.to_owned(),
            source,
        })?;
        let mut run = Process {
            child,
            log: log_path,
            clock_control,
            _dir: dir,
        };

        let outcome = poll_until(READY_TIMEOUT, || match run.child.try_wait() {
            Ok(Some(status)) => Some(Err(format!("exited during startup ({status})"))),
            Err(error) => Some(Err(format!("could not check the process: {error}"))),
            // PONG could come from another process that won the race for this port.
            // Redis listens on every port before it serves any, so the TLS
            // port is ready once the plain one answers.
            Ok(None) => (answers_ping(port)
                && owns_port(run.child.id(), port)
                && tls_port.is_none_or(|tls| owns_port(run.child.id(), tls)))
            .then_some(Ok(())),
        });
        let (exited, reason) = match outcome {
            Some(Ok(())) => return Ok(Launch::Ready(run)),
            Some(Err(reason)) => (true, reason),
            None => (false, format!("no answer to PING within {READY_TIMEOUT:?}")),
        };
        // Kill before reading the log so the tail is complete.
        let _ = run.kill();
        let error = HarnessError::NotReady {
            port,
            reason,
            log_tail: log_tail(&run.log),
        };
        if exited {
            Ok(Launch::Exited(error))
        } else {
            Err(error)
        }
    }

    fn kill(&mut self) -> Result<(), HarnessError> {
        let pid = self.child.id();
        self.child.kill().map_err(|source| HarnessError::Signal {
            signal: "SIGKILL",
            pid,
            source,
        })?;
        self.child.wait()?;
        Ok(())
    }

    #[allow(unsafe_code)] // libc::kill: std has no SIGSTOP/SIGCONT.
    fn signal(&self, signal: libc::c_int, name: &'static str) -> Result<(), HarnessError> {
        let pid = self.child.id();
        // SAFETY: kill(2) has no memory-safety preconditions. The child is not reaped
        // yet, so its pid cannot have been recycled for another process.
        if unsafe { libc::kill(pid as libc::pid_t, signal) } == 0 {
            Ok(())
        } else {
            Err(HarnessError::Signal {
                signal: name,
                pid,
                source: io::Error::last_os_error(),
            })
        }
    }

    /// Checks for exit without reaping, so that `Child` keeps owning the pid.
    #[allow(unsafe_code)] // libc::waitid: std's try_wait needs `&mut` and reaps.
    fn has_exited(&self) -> bool {
        // SAFETY: siginfo_t is plain data, valid when zeroed; waitid only writes to it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let options = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        let id = self.child.id() as libc::id_t;
        // SAFETY: `info` is a valid, writable siginfo_t.
        if unsafe { libc::waitid(libc::P_PID, id, &mut info, options) } != 0 {
            // Only possible if the child was reaped behind our back: it is gone.
            return true;
        }
        // With WNOHANG and no exited child, waitid leaves the fields zero.
        info.si_signo != 0
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SIGKILL also ends a SIGSTOPped process; waiting reaps it so nothing is orphaned.
        let _ = self.kill();
    }
}

/// A port nobody listens on right now. The server binds it a moment later, so another
/// process can still take it first: callers retry.
pub(super) fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// Calls `probe` with growing pauses until it returns `Some` or `timeout` has passed.
pub(super) fn poll_until<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        thread::sleep(pause.min(left));
        pause = (pause * 2).min(MAX_POLL_PAUSE);
    }
}

/// Whether a server on `port` answers a raw `PING`. `NOAUTH` counts: the server is up,
/// it just wants a password (`--requirepass`, ACLs). `LOADING` and silence do not.
pub(super) fn answers_ping(port: u16) -> bool {
    ping(port).is_ok_and(|reply| reply.starts_with(b"+PONG") || reply.starts_with(b"-NOAUTH"))
}

fn ping(port: u16) -> io::Result<Vec<u8>> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, PING_TIMEOUT)?;
    stream.set_read_timeout(Some(PING_TIMEOUT))?;
    stream.set_write_timeout(Some(PING_TIMEOUT))?;
    stream.write_all(b"*1\r\n$4\r\nPING\r\n")?;
    let mut reply = Vec::new();
    let mut chunk = [0; 64];
    // Replies to PING are one short line; the length cap bounds the loop regardless.
    while !reply.ends_with(b"\r\n") && reply.len() < 256 {
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            break;
        }
        reply.extend_from_slice(&chunk[..read]);
    }
    Ok(reply)
}

/// Whether process `pid` holds the listening socket of `port`, read from `/proc`.
/// Unknown (unreadable `/proc`) counts as yes: then PING alone decides.
#[cfg(target_os = "linux")]
fn owns_port(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return true;
    };
    let local = format!(":{port:04X}");
    // Columns: sl, local_address (hex ip:port), rem_address, st (0A = LISTEN), ..., inode.
    let sockets: Vec<String> = table
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|cols| cols.len() > 9 && cols[1].ends_with(&local) && cols[3] == "0A")
        .map(|cols| format!("socket:[{}]", cols[9]))
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return true;
    };
    fds.flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|target| {
            sockets
                .iter()
                .any(|socket| target.as_os_str() == socket.as_str())
        })
}

#[cfg(not(target_os = "linux"))]
fn owns_port(_pid: u32, _port: u16) -> bool {
    true
}

/// Makes the kernel kill the server when the test process dies, even by SIGKILL, when
/// no destructor runs.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // pre_exec and prctl: std has no parent-death signal.
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec the closure only makes async-signal-safe calls
    // (prctl, getppid) and builds errors without allocating.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(io::Error::last_os_error());
            }
            // A parent that died before prctl took effect would send no signal.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut Command) {}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `command` from one thread that lives as long as the process.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the
/// process: a server spawned from a scoped thread, a blocking-pool worker or a finished
/// test thread would be killed while still in use.
fn spawn(command: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let gone = || io::Error::other("the redis-server spawner thread is not running");
    let spawner = SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("quorumlock-redis-spawner".into())
            .spawn(move || {
                for (mut command, reply) in incoming {
                    let _ = reply.send(command.spawn());
                }
            })
            .ok()
            .map(|_| requests)
    });
    let (reply, answer) = mpsc::channel();
    spawner
        .as_ref()
        .ok_or_else(gone)?
        .send((command, reply))
        .map_err(|_| gone())?;
    answer.recv().map_err(|_| gone())?
}

fn log_tail(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
        }
        Err(error) => format!("(no log at {}: {error})", path.display()),
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn owns_port_tells_the_listener_from_other_processes() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = listener.local_addr().expect("addr").port();
        assert!(owns_port(std::process::id(), port));
        // Our parent (cargo or nextest) does not hold this socket.
        let parent = std::os::unix::process::parent_id();
        assert!(!owns_port(parent, port));
        drop(listener);
        assert!(!owns_port(std::process::id(), port));
    }
}
