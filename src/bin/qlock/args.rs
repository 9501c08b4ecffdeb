//! The command line.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand};

use crate::error::{code, eprint_line, EXIT_CODES_HELP};

/// The variable `--redis` is read from. Its URLs may carry passwords, so
/// `run` takes it out of CMD's environment (unless `--keep-env`).
pub const REDIS_URLS_VAR: &str = "QLOCK_REDIS_URLS";

/// qlock's own variables that may carry secrets: what `run` takes out of CMD's
/// environment. The others (the key prefix, TLS file paths, the insecure flag)
/// are no secret and stay.
pub const SECRET_VARS: &[&str] = &[REDIS_URLS_VAR];

/// Distributed locks over N Redis instances (Redlock), from the shell.
///
/// Instances come from repeated --redis URL or QLOCK_REDIS_URLS (comma
/// separated), and --cluster for Redis Cluster members. With neither, qlock starts 3 local redis-server processes for the
/// duration of the command (a demo: they share this machine's fate).
#[derive(Debug, Parser)]
#[command(name = "qlock", version, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub instances: InstanceArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Instances (for every command)")]
pub struct InstanceArgs {
    /// A Redis instance (redis://[user[:password]@]host[:port][/db], rediss://
    /// for TLS, or valkey://, valkeys://); repeat, or separate with commas.
    #[arg(
        long = "redis",
        value_name = "URL",
        env = REDIS_URLS_VAR,
        value_delimiter = ',',
        hide_env_values = true,
        global = true
    )]
    pub redis: Vec<String>,

    /// A Redis Cluster as one instance, by one or more of its nodes'
    /// redis:// URLs (commas between the nodes of one cluster); repeat for
    /// more clusters. It follows the --redis instances in the quorum's order.
    /// Lock keys must then have a hash tag ({name}) or no braces at all.
    #[arg(long = "cluster", value_name = "URL[,URL…]", global = true)]
    pub cluster: Vec<String>,

    /// Instances that must grant a lock [default: a majority, N/2 + 1].
    #[arg(long, value_name = "N", global = true)]
    pub quorum: Option<usize>,

    /// Fraction of the TTL set aside for clock drift [default: 0.01].
    #[arg(long, value_name = "FACTOR", global = true)]
    pub drift_factor: Option<f64>,

    /// How long one instance may take to answer, e.g. 50ms [default: 50ms].
    #[arg(long, value_name = "DURATION", value_parser = duration, global = true)]
    pub instance_timeout: Option<Duration>,

    /// Prefix put before every key in Redis, e.g. "locks:".
    #[arg(
        long,
        value_name = "PREFIX",
        env = "QLOCK_KEY_PREFIX",
        default_value = "",
        hide_default_value = true,
        hide_env_values = true,
        global = true
    )]
    pub key_prefix: String,

    /// For rediss:// instances: trust the CA certificates in this PEM file
    /// instead of the system's roots (self-signed or private CAs).
    #[arg(
        long,
        value_name = "FILE",
        env = "QLOCK_TLS_CA",
        global = true,
        help_heading = "TLS (rediss:// instances)"
    )]
    pub tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) for servers run with tls-auth-clients; needs
    /// --tls-key.
    #[arg(
        long,
        value_name = "FILE",
        env = "QLOCK_TLS_CERT",
        requires = "tls_key",
        global = true,
        help_heading = "TLS (rediss:// instances)"
    )]
    pub tls_cert: Option<PathBuf>,

    /// The client certificate's private key (PEM); needs --tls-cert.
    #[arg(
        long,
        value_name = "FILE",
        env = "QLOCK_TLS_KEY",
        requires = "tls_cert",
        global = true,
        help_heading = "TLS (rediss:// instances)"
    )]
    pub tls_key: Option<PathBuf>,

    /// DANGER: accept any server certificate, for any host name (no
    /// verification: anyone on the path can read and change the traffic).
    #[arg(
        long,
        env = "QLOCK_TLS_INSECURE",
        global = true,
        help_heading = "TLS (rediss:// instances)"
    )]
    pub tls_insecure: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Run(RunArgs),
    Status(StatusArgs),
    Health(HealthArgs),
    Bench(BenchArgs),
}

/// Run a command while holding a lock, like flock(1) across Redis servers.
///
/// Takes the lock (waiting up to --wait), extends it every third of --ttl while
/// CMD runs, and releases it when CMD exits; CMD's exit status is qlock's. The
/// options are checked before anything connects: a bad --key, --ttl, --wait,
/// --grace or --metadata exits 2 at once.
///
/// CMD runs in its own process group, so that signals qlock sends reach
/// everything it started; it is for batch work, without the terminal: a CMD
/// that reads it (or writes with `stty tostop`) is stopped by SIGTTIN (SIGTTOU),
/// as under timeout(1). qlock says so once on stderr and keeps the lock until
/// CMD exits; give CMD its input from a file or </dev/null. On Linux, CMD's
/// first process gets SIGKILL if qlock dies, even of SIGKILL (nothing would
/// extend the lock); the processes it started do not. CMD's environment is
/// qlock's without QLOCK_REDIS_URLS (its URLs may hold passwords), unless
/// --keep-env.
///
/// If the lock is lost, or about to be, while CMD runs, CMD is stopped and qlock
/// exits 74; where qlock can see it coming, before the validity ends. When
/// extends keep failing (instances not answering) until less than --grace, and
/// no more than about a third of --ttl, of the validity is left, CMD's process
/// group gets SIGTERM, then SIGKILL at the validity's end or after --grace,
/// whichever comes first: a CMD that ignores SIGTERM is killed when the validity
/// ends. An extend that still gets through gives CMD more of --grace but does
/// not call the SIGTERM back.
///
/// When an extend finds the key deleted, or held by another owner, on enough
/// instances, a successor may already hold the lock: CMD gets SIGTERM at once
/// and SIGKILL 1s later (or after --grace, if shorter). That 1s is for a SIGTERM
/// handler to clean up; the same applies if qlock finds the validity over after
/// being paused itself.
///
/// Overlap window, where CMD may still run while another owner holds the lock:
/// past the validity's end, the time SIGKILL takes to arrive and the kernel to
/// end CMD's process group (well under a millisecond unless qlock is starved of
/// CPU or a process sits in uninterruptible I/O; the drift allowance between the
/// validity's end and the keys' expiry usually covers it). After a deletion or
/// takeover: until the next extend notices it (up to a third of --ttl), plus up
/// to 1s. Processes that left CMD's process group (setsid, daemons) are never
/// signalled, and nothing is while qlock itself is stopped or its machine
/// suspended.
///
/// SIGINT, SIGTERM or SIGHUP to qlock is passed on as SIGTERM, with SIGCONT for a
/// stopped CMD (a second one sends SIGKILL at once); qlock keeps extending the
/// lock while CMD stops (SIGKILL after --grace, or earlier as above if the lock
/// is lost meanwhile), releases it and exits 128 + the signal's number.
#[derive(Debug, Args)]
#[command(after_help = EXIT_CODES_HELP)]
pub struct RunArgs {
    /// The lock's name.
    #[arg(long, short)]
    pub key: String,

    /// The lock's TTL in Redis; the lock is extended every third of it.
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "30s")]
    pub ttl: Duration,

    /// Run under one of K permits of the semaphore named by --key instead of
    /// its lock: at most K commands at once (every caller must give the same
    /// K).
    #[arg(long, value_name = "K")]
    pub semaphore: Option<usize>,

    /// How long to wait for the lock; 0 for one attempt.
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "10s")]
    pub wait: Duration,

    /// How long CMD has between SIGTERM and SIGKILL when it must stop; never past
    /// the lock's validity, and at most 1s once qlock knows the lock is gone.
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "5s")]
    pub grace: Duration,

    /// Stored beside the token for `qlock status` [default: "qlock pid=<pid>
    /// host=<host> cmd=<CMD>"].
    #[arg(long, value_name = "TEXT")]
    pub metadata: Option<String>,

    /// Stop CMD (SIGTERM, then SIGKILL after --grace) and release the lock
    /// once it has been held this long, as timeout(1) would: exit code 124. A
    /// CMD that hangs cannot keep the lock for ever. Default: no bound.
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub max_hold: Option<Duration>,

    /// Leave QLOCK_REDIS_URLS in CMD's environment (by default it is removed:
    /// its URLs may hold passwords), e.g. for a CMD that runs qlock itself.
    #[arg(long)]
    pub keep_env: bool,

    /// The command and its arguments (after `--`, or after the last option).
    #[arg(
        value_name = "CMD",
        required = true,
        num_args = 1..,
        trailing_var_arg = true,
        value_hint = clap::ValueHint::CommandWithArguments
    )]
    pub command: Vec<OsString>,
}

/// Show, instance by instance, who holds a lock and whether a quorum agrees.
///
/// Read-only (GET and PTTL on each instance). Exits 0 when a quorum holds the
/// lock, 3 when none does, 1 when too few instances answered to tell.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The lock's name (without the key prefix).
    pub key: String,
}

/// Check every instance: reachable, latency, run_id, clock offset.
///
/// Exits 1 when fewer than a quorum are reachable, or when two addresses are
/// the same server.
#[derive(Debug, Args)]
pub struct HealthArgs {}

/// Acquire and release locks for a few seconds and report latencies.
///
/// Each task takes and releases its own key (`<KEY>:<pid>:<task>`) in a loop.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub seconds: u64,

    /// Concurrent acquire+release loops.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub tasks: u64,

    /// The TTL of each lock.
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "10s")]
    pub ttl: Duration,

    /// Base name of the keys.
    #[arg(long, default_value = "qlock-bench")]
    pub key: String,

    /// Then run again with this much latency added to every round trip to the
    /// last --slow instances (through in-process proxies): a tolerance run.
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub latency: Option<Duration>,

    /// How many instances --latency slows down.
    #[arg(long, default_value_t = 1, requires = "latency")]
    pub slow: usize,
}

/// A human duration: `50ms`, `1.5s`, `1m 30s`.
fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|err| format!("{err} (examples: 50ms, 1.5s, 2m)"))
}

/// Parses the command line; on a usage error, reports it on one line and
/// returns the exit code.
pub fn parse() -> Result<Cli, u8> {
    Cli::try_parse().map_err(|err| match err.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = err.print();
            u8::try_from(err.exit_code()).unwrap_or(code::USAGE)
        }
        _ => {
            eprint_line(&format!(
                "qlock: error: {} (see qlock --help)",
                clap_message(&err)
            ));
            code::USAGE
        }
    })
}

/// Clap's multi-line report as one line: the message and its details, without
/// the usage block.
fn clap_message(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    let kept: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .take_while(|line| !line.starts_with("Usage:"))
        .filter(|line| !line.is_empty() && !line.starts_with("For more information"))
        .collect();
    let message = kept.join(" ");
    match message.strip_prefix("error: ") {
        Some(rest) => rest.to_string(),
        None => message,
    }
}
