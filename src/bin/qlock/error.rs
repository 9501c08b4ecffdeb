//! Exit codes and the one-line error every failure ends in.

use std::fmt;

use quorumlock::Error;

/// Exit codes; `qlock --help` lists them (keep `EXIT_CODES_HELP` in step).
pub mod code {
    /// Success, or the command's own exit status.
    pub const OK: u8 = 0;
    /// Any other error: instances unreachable, a Redis error, an I/O error.
    pub const FAILURE: u8 = 1;
    /// Bad usage: unknown option, bad duration, URL, quorum, key, TTL or
    /// metadata; found before anything connects.
    pub const USAGE: u8 = 2;
    /// `status`: no quorum of instances holds one value, so the lock is free.
    pub const NOT_HELD: u8 = 3;
    /// `run`: the lock was lost while the command ran, or could not be extended
    /// until too little validity was left; the command was stopped. (EX_IOERR.)
    pub const LOCK_LOST: u8 = 74;
    /// `run`: the lock was not acquired within `--wait`. (EX_TEMPFAIL.)
    pub const WAIT_EXPIRED: u8 = 75;
    /// `run`: the command was found but could not be executed.
    pub const CANNOT_EXECUTE: u8 = 126;
    /// `run`: the command was not found.
    pub const NOT_FOUND: u8 = 127;
    /// Killed by signal `n`: `128 + n`.
    pub const SIGNAL_BASE: u8 = 128;
}

/// The exit codes as `--help` shows them.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0        success; for `run`, the command's own exit status is passed through
  1        error: instances unreachable (no quorum), Redis or I/O failure
  2        usage error: bad option, duration, URL, quorum, key, TTL, metadata or
           drift factor (found before anything connects)
  3        status: the lock is not held by a quorum
  74       run: the lock was lost (or could not be extended) while the command ran;
           the command was stopped
  75       run: the lock (or a --semaphore permit) was not acquired within --wait
  124      run: --max-hold passed; the command was stopped (as timeout(1))
  126/127  run: the command could not be executed / was not found
  128+N    run: the command died of signal N; 130/143 after qlock got SIGINT/SIGTERM";

/// A failure to report as `qlock: error: <message>` and exit with `code`.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    message: String,
}

impl CliError {
    pub fn usage(message: impl fmt::Display) -> Self {
        Self::new(code::USAGE, message)
    }

    pub fn failure(message: impl fmt::Display) -> Self {
        Self::new(code::FAILURE, message)
    }

    pub fn new(code: u8, message: impl fmt::Display) -> Self {
        Self {
            code,
            message: one_line(&message.to_string()),
        }
    }

    /// The library's error, prefixed with what qlock was doing.
    pub fn context(context: &str, err: Error) -> Self {
        let mut cli = Self::from(err);
        cli.message = format!("{context}: {}", cli.message);
        cli
    }

    pub fn report(&self) {
        eprint_line(&format!("qlock: error: {}", self.message));
    }
}

impl From<Error> for CliError {
    /// Input the library refused is a usage error; anything found out over the
    /// network is a failure.
    fn from(err: Error) -> Self {
        let code = match err {
            Error::InvalidUrl { .. }
            | Error::QuorumOutOfRange { .. }
            | Error::InvalidTtl { .. }
            | Error::InvalidConfig { .. }
            | Error::EmptyKey
            | Error::ReservedKey { .. }
            | Error::KeyNotForCluster { .. }
            | Error::NoInstances
            | Error::DuplicateInstance { .. } => code::USAGE,
            _ => code::FAILURE,
        };
        Self::new(code, err)
    }
}

/// Messages from servers and the harness may span lines (a log tail); an error
/// must stay on one.
pub fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Writes one line to stderr; never panics (a closed pipe is not worth a crash).
pub fn eprint_line(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Writes `text` to stdout; a reader that went away (`| head`) is not an error.
pub fn print(text: &str) -> Result<(), CliError> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(CliError::failure(format!("writing to stdout: {err}")))
        }
        _ => Ok(()),
    }
}

/// `qlock: <message>` on stderr, for notices that are not errors.
macro_rules! notice {
    ($($arg:tt)*) => {
        $crate::error::eprint_line(&format!("qlock: {}", format_args!($($arg)*)))
    };
}
pub(crate) use notice;
