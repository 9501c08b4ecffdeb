//! A `redis-server` child process: its launch in a directory of its own, the
//! signals that kill, stop and continue it, and the kernel's promise to kill it
//! with the test process.

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::Duration;

use tempfile::TempDir;

use super::builder::RedisServerBuilder;
use super::ports::{owns_port, Ports};
use super::ready::{answers_ping, poll_until};
use crate::testing::clock;
use crate::testing::HarnessError;

const READY_TIMEOUT: Duration = Duration::from_secs(10);
const LOG_FILE: &str = "redis.log";
const LOG_TAIL_LINES: usize = 30;

/// A running `redis-server` child and its private directory, killed and reaped on drop.
pub(super) struct Process {
    child: Child,
    log: PathBuf,
    /// The clock shim's control file, when the server runs with it.
    clock_control: Option<PathBuf>,
    /// Removed after the child is dead (fields drop after `Drop::drop`).
    _dir: TempDir,
}

pub(super) enum Launch {
    Ready(Process),
    /// The server exited during startup; retrying on another port may help.
    Exited(HarnessError),
}

impl Process {
    pub(super) fn launch(
        bin: &Path,
        config: &RedisServerBuilder,
        ports: Ports,
    ) -> Result<Launch, HarnessError> {
        let port = ports.plain;
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
        if let Some(file) = &config.config_file {
            // Redis reads a configuration file only as its first argument.
            command.arg(file);
        }
        command
            .arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(&log_path);
        if let (Some(dir), Some(bus)) = (&config.cluster, ports.cluster_bus) {
            command
                .args(["--cluster-enabled", "yes", "--cluster-port"])
                .arg(bus.to_string())
                .arg("--cluster-config-file")
                .arg(dir.join(format!("nodes-{port}.conf")));
        }
        if let (Some(files), Some(tls_port)) = (&config.tls, ports.tls) {
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
        let child = spawn_child(command).map_err(|source| HarnessError::Spawn {
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
            // Redis listens on every port (the TLS one, the cluster bus) before it
            // serves any, so they are ready once the plain one answers.
            Ok(None) => (answers_ping(port)
                && ports.all().all(|port| owns_port(run.child.id(), port)))
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

    pub(super) fn kill(&mut self) -> Result<(), HarnessError> {
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
    pub(super) fn signal(
        &self,
        signal: libc::c_int,
        name: &'static str,
    ) -> Result<(), HarnessError> {
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
    pub(super) fn has_exited(&self) -> bool {
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

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn log(&self) -> &Path {
        &self.log
    }

    pub(super) fn clock_control(&self) -> Option<&Path> {
        self.clock_control.as_deref()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SIGKILL also ends a SIGSTOPped process; waiting reaps it so nothing is orphaned.
        let _ = self.kill();
    }
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

/// Spawns `command` so that the kernel kills it with the test process: redis-server
/// here, and the tools other fixtures run (`redis-cli --cluster create`).
pub(in crate::testing) fn spawn_child(mut command: Command) -> io::Result<Child> {
    die_with_parent(&mut command);
    spawn(command)
}

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
