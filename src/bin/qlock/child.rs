//! The command `run` starts: its own process group, signals, exit status.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use quorumlock::LockStatus;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::Instant;

use crate::args::SECRET_VARS;
use crate::error::{code, notice, CliError};

/// The command, in a process group of its own so that a signal reaches
/// everything it started (a shell's children too), not just its first process.
pub struct Child {
    inner: tokio::process::Child,
    /// SIGCHLD, listened to from before the spawn: the kernel sends one when
    /// the command stops, which `wait` does not report.
    #[cfg(target_os = "linux")]
    sigchld: Signal,
}

/// What [`Child::watch`] saw.
pub enum Event {
    Exited(ExitStatus),
    /// The command was stopped by this signal (SIGTTIN, SIGSTOP…).
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    Stopped(i32),
}

/// Starts `command`. Unless `keep_env`, its environment is qlock's without
/// [`SECRET_VARS`] (`QLOCK_REDIS_URLS`: its URLs may carry passwords).
pub fn spawn(command: &[OsString], keep_env: bool) -> Result<Child, CliError> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| CliError::usage("no command given"))?;
    #[cfg(target_os = "linux")]
    let sigchld = signal(SignalKind::child())
        .map_err(|err| CliError::failure(format!("cannot install a signal handler: {err}")))?;
    let mut spawning = tokio::process::Command::new(program);
    spawning
        .args(args)
        .process_group(0)
        // A backstop for early returns; the normal paths wait for it.
        .kill_on_drop(true);
    if !keep_env {
        for var in SECRET_VARS {
            spawning.env_remove(var);
        }
    }
    #[cfg(target_os = "linux")]
    die_with_qlock(&mut spawning);
    match spawning.spawn() {
        Ok(inner) => Ok(Child {
            inner,
            #[cfg(target_os = "linux")]
            sigchld,
        }),
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

/// SIGKILL to the command when qlock dies, however it dies (SIGKILL, the OOM
/// killer, a panic that aborts): nothing extends the lock after that, so the
/// command must not go on as if it held it. Only the command's first process:
/// the kernel has no such link for the processes it starts.
///
/// The kernel sends it when the *thread* that forked the command ends: `run`
/// spawns from the main thread (inside `block_on`), which lives as long as
/// qlock.
#[cfg(target_os = "linux")]
fn die_with_qlock(command: &mut tokio::process::Command) {
    let qlock = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: prctl(2) and getppid(2) are, and it
    // allocates nothing (an OS error is a plain number).
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // qlock died between the fork and the prctl: the signal will never
            // come, so do not run the command at all.
            if u32::try_from(libc::getppid()).ok() != Some(qlock) {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
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

    /// Waits for the command to exit or to stop; each stop is reported once.
    /// (Stops are seen on Linux only; elsewhere this is [`wait`](Self::wait).)
    /// Cancel-safe.
    pub async fn watch(&mut self) -> Result<Event, CliError> {
        #[cfg(target_os = "linux")]
        loop {
            if let Some(signo) = self.stop_signal() {
                return Ok(Event::Stopped(signo));
            }
            tokio::select! {
                biased;
                status = self.inner.wait() => {
                    return status.map(Event::Exited).map_err(|err| {
                        CliError::failure(format!("waiting for the command: {err}"))
                    });
                }
                Some(()) = self.sigchld.recv() => {}
            }
        }
        #[cfg(not(target_os = "linux"))]
        self.wait().await.map(Event::Exited)
    }

    /// What qlock says, once, when the command stops (by `signo`): why, and what
    /// now. The lock stays held, and extended, until the command exits, as for
    /// a slow command: qlock cannot tell whether someone will continue it.
    pub fn stopped(&self, signo: i32) -> String {
        let qlock = std::process::id();
        let why = match signo {
            libc::SIGTTIN => "it tried to read the terminal",
            libc::SIGTTOU => "it tried to write to the terminal (stty tostop) or to set it up",
            _ => {
                let group = self
                    .inner
                    .id()
                    .map_or_else(String::new, |pid| format!(" (kill -CONT -{pid})"));
                return format!(
                    "CMD is stopped ({}); qlock keeps the lock until CMD exits: continue it{group}, \
                     or end it with Ctrl-C or kill {qlock}",
                    name(signo)
                );
            }
        };
        format!(
            "CMD is stopped ({}): {why}; it runs without the terminal, in a process group of its \
             own (give it input from a file or </dev/null); qlock keeps the lock until CMD exits: \
             end it with Ctrl-C or kill {qlock}",
            name(signo)
        )
    }

    /// The signal that stopped the command, if it stopped since the last call.
    /// waitid(2) with `WSTOPPED` alone reports stops and never reaps an exit, so
    /// Tokio's `wait` still sees that.
    #[cfg(target_os = "linux")]
    fn stop_signal(&self) -> Option<i32> {
        // Not yet reaped (reaping happens only in `wait`, which this borrow
        // excludes): the pid is still the command's.
        let pid = self.inner.id()?;
        // SAFETY: siginfo_t is plain data, valid zeroed; waitid(2) writes into
        // it and touches nothing else.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let found =
            unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WSTOPPED | libc::WNOHANG) };
        // SAFETY: waitid(2) filled `info` for a child in the state asked for;
        // si_pid is 0 when none was.
        let (stopped, signo) = unsafe { (info.si_pid(), info.si_status()) };
        (found == 0 && stopped != 0 && info.si_code == libc::CLD_STOPPED).then_some(signo)
    }

    /// SIGTERM, then SIGKILL at the [`Deadline`] or at the next signal to qlock;
    /// waits for the command to exit. `lock` is watched throughout: an extend
    /// moves the deadline back towards `grace`, a loss brings it forward.
    pub async fn terminate(
        &mut self,
        grace: Duration,
        lock: &LockStatus,
        signals: &mut Signals,
    ) -> Result<ExitStatus, CliError> {
        self.signal(libc::SIGTERM);
        // A stopped command acts on SIGTERM only once continued; as timeout(1)
        // does, continue it (a running one ignores SIGCONT).
        self.signal(libc::SIGCONT);
        let mut deadline = Deadline::new(Instant::now(), grace, lock);
        loop {
            let (at, _) = deadline.at();
            tokio::select! {
                biased;
                status = self.wait() => return status,
                signo = signals.recv() => {
                    notice!("{}: sending SIGKILL to the command", name(signo));
                    break;
                }
                () = lock.lost(), if !deadline.lost() => {
                    deadline.lose(Instant::now());
                    let (at, reason) = deadline.at();
                    let left = at.saturating_duration_since(Instant::now());
                    // Only when the loss brought SIGKILL forward.
                    if reason == KillReason::Lost && !left.is_zero() {
                        notice!(
                            "the lock was lost while the command stopped: SIGKILL in {}",
                            brief(left)
                        );
                    }
                }
                () = tokio::time::sleep_until(at) => {
                    // An extend may have moved the validity's end since.
                    deadline.observe(lock);
                    let (at, reason) = deadline.at();
                    if at > Instant::now() {
                        continue;
                    }
                    match reason {
                        KillReason::Grace => notice!(
                            "the command did not stop within {} of SIGTERM: sending SIGKILL",
                            brief(grace)
                        ),
                        KillReason::Validity => notice!(
                            "the lock's validity ends and the command has not stopped: \
                             sending SIGKILL"
                        ),
                        KillReason::Lost => notice!(
                            "the command did not stop within {} of the lock's loss: \
                             sending SIGKILL",
                            brief(LOST_GRACE)
                        ),
                    }
                    break;
                }
            }
        }
        self.signal(libc::SIGKILL);
        self.wait().await
    }
}

/// How long a command may outlive qlock's learning that the lock is gone (the
/// key deleted, or held by another owner, on enough instances; or its validity
/// found over after a pause): a successor may already be at work, so all of it
/// is overlap. Enough for a SIGTERM handler to remove a temporary file or write
/// a line to a log; short next to any TTL worth running a command under.
pub const LOST_GRACE: Duration = Duration::from_secs(1);

/// What sets the SIGKILL deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillReason {
    /// `--grace` after the SIGTERM.
    Grace,
    /// The end of the lock's validity: past it, another owner may hold the lock.
    Validity,
    /// [`LOST_GRACE`] after qlock learned the lock was gone.
    Lost,
}

/// When SIGKILL follows a SIGTERM: the earliest of `grace` after it, the end of
/// the lock's validity as last seen while the lock was valid, and
/// [`LOST_GRACE`] after qlock learned the lock was gone.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    by_grace: Instant,
    /// The validity's end, while the lock was valid; frozen by a loss (a lost
    /// lock's validity says nothing more).
    valid_until: Option<Instant>,
    lost_at: Option<Instant>,
}

impl Deadline {
    /// For a SIGTERM sent at `term_at`.
    pub fn new(term_at: Instant, grace: Duration, lock: &LockStatus) -> Self {
        let mut deadline = Self {
            by_grace: term_at + grace,
            valid_until: None,
            lost_at: None,
        };
        deadline.observe(lock);
        if deadline.valid_until.is_none() {
            deadline.lose(term_at);
        }
        deadline
    }

    /// Follows the lock's validity, until it is lost.
    pub fn observe(&mut self, lock: &LockStatus) {
        if self.lost() {
            return;
        }
        // Read before the check: a loss in between then leaves the last
        // validity end that held.
        let valid_until = lock.valid_until();
        if lock.is_valid() {
            self.valid_until = Some(valid_until);
        }
    }

    /// qlock learned at `at` that the lock is gone.
    pub fn lose(&mut self, at: Instant) {
        self.lost_at.get_or_insert(at);
    }

    pub fn lost(&self) -> bool {
        self.lost_at.is_some()
    }

    pub fn at(&self) -> (Instant, KillReason) {
        let mut deadline = (self.by_grace, KillReason::Grace);
        if let Some(valid_until) = self.valid_until {
            if valid_until < deadline.0 {
                deadline = (valid_until, KillReason::Validity);
            }
        }
        if let Some(lost_at) = self.lost_at {
            if lost_at + LOST_GRACE < deadline.0 {
                deadline = (lost_at + LOST_GRACE, KillReason::Lost);
            }
        }
        deadline
    }
}

/// "SIGTERM, then SIGKILL in 5s": the plan for a command stopped now,
/// as [`Child::terminate`] will start it.
pub fn stopping(grace: Duration, lock: &LockStatus) -> String {
    let now = Instant::now();
    let (at, reason) = Deadline::new(now, grace, lock).at();
    let after = at.saturating_duration_since(now);
    if after.is_zero() {
        return "SIGTERM, then SIGKILL at once".to_string();
    }
    let after = brief(after);
    match reason {
        KillReason::Grace => format!("SIGTERM, then SIGKILL in {after}"),
        KillReason::Validity => format!(
            "SIGTERM, then SIGKILL when the lock's validity ends, in {after} unless \
             extended (then up to {})",
            brief(grace)
        ),
        KillReason::Lost => {
            format!("SIGTERM, then SIGKILL in {after}, as a successor may already hold the lock")
        }
    }
}

/// A duration to the millisecond, for messages: "1s 987ms".
pub fn brief(duration: Duration) -> String {
    let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    humantime::format_duration(Duration::from_millis(millis)).to_string()
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
        libc::SIGSTOP => "SIGSTOP".to_string(),
        libc::SIGTSTP => "SIGTSTP".to_string(),
        libc::SIGTTIN => "SIGTTIN".to_string(),
        libc::SIGTTOU => "SIGTTOU".to_string(),
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
