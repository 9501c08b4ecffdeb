//! The command `run` starts: its own process group, signals, exit status.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::error::{code, notice, CliError};

/// The command, in a process group of its own so that a signal reaches
/// everything it started (a shell's children too), not just its first process.
pub struct Child {
    inner: tokio::process::Child,
}

pub fn spawn(command: &[OsString]) -> Result<Child, CliError> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| CliError::usage("no command given"))?;
    let spawned = tokio::process::Command::new(program)
        .args(args)
        .process_group(0)
        // A backstop for early returns; the normal paths wait for it.
        .kill_on_drop(true)
        .spawn();
    match spawned {
        Ok(inner) => Ok(Child { inner }),
        Err(err) => {
            let exit = match err.kind() {
                io::ErrorKind::NotFound => code::NOT_FOUND,
                _ => code::CANNOT_EXECUTE,
            };
            Err(CliError::new(
                exit,
                format!("cannot run {:?}: {err}", program.to_string_lossy()),
            ))
        }
    }
}

impl Child {
    /// Sends `signo` to the command's process group. Only while the command is
    /// not yet reaped: until then its pid, which is the group's id, cannot be
    /// reused.
    pub fn signal(&self, signo: i32) {
        let Some(pid) = self.inner.id().and_then(|pid| i32::try_from(pid).ok()) else {
            return;
        };
        // SAFETY: kill(2) takes plain integers and touches none of our memory.
        // ESRCH (the group is already gone) is fine.
        unsafe {
            libc::kill(-pid, signo);
        }
    }

    /// Waits for the command to exit. Cancel-safe.
    pub async fn wait(&mut self) -> Result<ExitStatus, CliError> {
        self.inner
            .wait()
            .await
            .map_err(|err| CliError::failure(format!("waiting for the command: {err}")))
    }

    /// SIGTERM, then SIGKILL after `grace` or at the next signal to qlock;
    /// waits for the command to exit.
    pub async fn terminate(
        &mut self,
        grace: Duration,
        signals: &mut Signals,
    ) -> Result<ExitStatus, CliError> {
        self.signal(libc::SIGTERM);
        tokio::select! {
            status = self.wait() => return status,
            () = tokio::time::sleep(grace) => notice!(
                "the command did not stop within {} of SIGTERM: sending SIGKILL",
                humantime::format_duration(grace)
            ),
            signo = signals.recv() => notice!("{}: sending SIGKILL to the command", name(signo)),
        }
        self.signal(libc::SIGKILL);
        self.wait().await
    }
}

/// The shell's convention: the exit code, or 128 + the signal that killed it.
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(exit), _) => u8::try_from(exit & 0xff).unwrap_or(code::FAILURE),
        (None, Some(signo)) => signal_exit_code(signo),
        (None, None) => code::FAILURE,
    }
}

pub fn signal_exit_code(signo: i32) -> u8 {
    u8::try_from(signo)
        .ok()
        .and_then(|signo| code::SIGNAL_BASE.checked_add(signo))
        .unwrap_or(code::FAILURE)
}

/// "exited with 3", "was killed by SIGTERM".
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(exit), _) => format!("exited with {exit}"),
        (None, Some(signo)) => format!("was killed by {}", name(signo)),
        (None, None) => status.to_string(),
    }
}

/// The signals qlock passes on to the command.
pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl Signals {
    /// Installs the handlers: from here on these signals no longer kill qlock.
    pub fn install() -> Result<Self, CliError> {
        let install = |kind| {
            signal(kind)
                .map_err(|err| CliError::failure(format!("cannot install a signal handler: {err}")))
        };
        Ok(Self {
            interrupt: install(SignalKind::interrupt())?,
            terminate: install(SignalKind::terminate())?,
            hangup: install(SignalKind::hangup())?,
        })
    }

    /// The next signal's number. Cancel-safe.
    pub async fn recv(&mut self) -> i32 {
        tokio::select! {
            Some(()) = self.interrupt.recv() => libc::SIGINT,
            Some(()) = self.terminate.recv() => libc::SIGTERM,
            Some(()) = self.hangup.recv() => libc::SIGHUP,
            else => std::future::pending().await,
        }
    }
}

pub fn name(signo: i32) -> String {
    match signo {
        libc::SIGHUP => "SIGHUP".to_string(),
        libc::SIGINT => "SIGINT".to_string(),
        libc::SIGQUIT => "SIGQUIT".to_string(),
        libc::SIGKILL => "SIGKILL".to_string(),
        libc::SIGPIPE => "SIGPIPE".to_string(),
        libc::SIGTERM => "SIGTERM".to_string(),
        _ => format!("signal {signo}"),
    }
}

/// This machine's name, for the lock's metadata.
pub fn hostname() -> Option<String> {
    let mut buffer = [0u8; 256];
    // SAFETY: the pointer and length describe `buffer`, which gethostname(2)
    // writes at most `len` bytes into.
    let result = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    if result != 0 {
        return None;
    }
    let end = buffer.iter().position(|&byte| byte == 0)?;
    String::from_utf8(buffer[..end].to_vec())
        .ok()
        .filter(|host| !host.is_empty())
}
