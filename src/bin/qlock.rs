//! `qlock`: quorumlock's distributed locks from the shell.
//!
//! - `qlock run --key K -- CMD…` runs CMD under a lock, like flock(1) across N
//!   Redis servers;
//! - `qlock status K` shows who holds a lock, instance by instance;
//! - `qlock health` checks the instances;
//! - `qlock bench` measures acquire+release.
//!
//! Exit codes are in `error::code` and `qlock --help`. Every failure ends in
//! one `qlock: error: …` line, a panic included (see `install_panic_hook`).

// A crate root's submodules live beside it (src/bin/), so name the directory.
#[path = "qlock/args.rs"]
mod args;
#[path = "qlock/bench.rs"]
mod bench;
#[path = "qlock/child.rs"]
mod child;
#[path = "qlock/error.rs"]
mod error;
#[path = "qlock/health.rs"]
mod health;
#[path = "qlock/run.rs"]
mod run;
#[path = "qlock/status.rs"]
mod status;
#[path = "qlock/table.rs"]
mod table;
#[path = "qlock/target.rs"]
mod target;

use std::panic::PanicHookInfo;
use std::process::ExitCode;
use std::time::Duration;

use args::{Cli, Command};
use error::{code, eprint_line, one_line, CliError};
use target::{Instances, Target};

/// How long to wait at exit for background work: rollbacks of an interrupted
/// attempt, releases still in flight. What does not finish expires by its TTL.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    install_panic_hook();
    // A panic was reported by the hook; unwinding has run the destructors
    // (child processes, local servers).
    ExitCode::from(std::panic::catch_unwind(qlock).unwrap_or(code::FAILURE))
}

fn qlock() -> u8 {
    let cli = match args::parse() {
        Ok(cli) => cli,
        Err(exit) => return exit,
    };
    execute(cli).unwrap_or_else(|err| {
        err.report();
        err.code
    })
}

fn execute(cli: Cli) -> Result<u8, CliError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|err| CliError::failure(format!("cannot start the Tokio runtime: {err}")))?;
    // `run`'s own options first: bad input is a usage error before anything
    // starts or connects.
    if let Command::Run(args) = &cli.command {
        runtime.block_on(run::check(&cli.instances, args))?;
    }
    // Local servers, if qlock starts its own, live until the end of this function.
    let instances = Instances::resolve(&cli.instances)?;
    let result = runtime.block_on(async {
        let target = Target::build(&instances, &cli.instances).await?;
        let result = match &cli.command {
            Command::Run(args) => run::run(&target, args).await,
            Command::Status(args) => status::status(&target, args).await,
            Command::Health(_) => health::health(&target).await,
            Command::Bench(args) => bench::bench(&target, args).await,
        };
        let _ = tokio::time::timeout(SETTLE_TIMEOUT, target.locker.settle()).await;
        result
    });
    runtime.shutdown_timeout(Duration::from_millis(500));
    drop(instances);
    result
}

/// A panic is a bug in qlock, but it still ends in one line, not a backtrace
/// hint in the middle of a script's log.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info: &PanicHookInfo<'_>| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("unknown panic");
        let location = info
            .location()
            .map(|at| format!(" at {}:{}", at.file(), at.line()))
            .unwrap_or_default();
        eprint_line(&format!(
            "qlock: error: internal error{location}: {} (a bug in qlock; please report it)",
            one_line(message)
        ));
    }));
}
