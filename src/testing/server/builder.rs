//! The settings a [`RedisServer`] starts with, and restarts with.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::testing::clock::ClockSetting;

// For the docs' links only: this file depends on nothing of the fixture.
#[cfg(doc)]
use super::RedisServer;
#[cfg(doc)]
use crate::testing::HarnessError;

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
    /// `Some`: read this configuration file, given as the first argument.
    pub(super) config_file: Option<PathBuf>,
    /// `Some`: a Redis Cluster node, with a cluster bus port of its own and its
    /// `nodes-<port>.conf` in this directory, which outlives its restarts.
    pub(super) cluster: Option<PathBuf>,
}

/// The PEM files a TLS server runs with; see [`RedisServerBuilder::tls`].
#[derive(Debug, Clone)]
pub(super) struct TlsFiles {
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
    pub(super) ca: PathBuf,
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
    /// readiness on it, and [`RedisCluster::connection`](crate::testing::RedisCluster::connection)
    /// and [`keys`](crate::testing::RedisCluster::keys) inspect keys through it, so that
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

    /// Reads this configuration file first (`redis-server <file> ...`); the fixture's
    /// own flags and the [`arg`](Self::arg)s follow it, so they override it.
    ///
    /// The server may write to the file: a Sentinel (`.arg("--sentinel")`) rewrites
    /// its configuration with what it learns, as [`SentinelSet`] has its sentinels do,
    /// and reads it back after [`RedisServer::restart_empty`]. Not available on the
    /// Docker fallback ([`HarnessError::Unsupported`]).
    ///
    /// [`SentinelSet`]: crate::testing::SentinelSet
    pub fn config_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config_file = Some(path.into());
        self
    }

    /// Makes the server a Redis Cluster node (`--cluster-enabled yes`) with a free
    /// cluster bus port (`--cluster-port`) and its cluster configuration in
    /// `dir/nodes-<port>.conf`; both survive restarts, so a restarted node keeps its
    /// identity and rejoins. For [`ShardedCluster`](crate::testing::ShardedCluster).
    pub(in crate::testing) fn cluster_node(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cluster = Some(dir.into());
        self
    }

    /// Puts `args` before the ones given so far, as a fixture's defaults that the
    /// caller's own arguments still override.
    pub(in crate::testing) fn defaults<I>(mut self, args: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<OsString>,
    {
        let mut all: Vec<OsString> = args.into_iter().map(Into::into).collect();
        all.append(&mut self.args);
        self.args = all;
        self
    }

    // `start` is in `mod.rs`, with the fixture it makes.
}
