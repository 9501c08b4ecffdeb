//! `qlock run`: a command under a lock that a watchdog keeps alive.

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use quorumlock::{Error, Lock, LockGuard, MemoryInstance, Permit, QuorumLocker, MAX_TTL};
use tokio::time::Instant;

use crate::args::{InstanceArgs, RunArgs};
use crate::child::{self, Event, Signals};
use crate::error::{code, notice, one_line, CliError};
use crate::status::{self, Observation, Seen, Verdict};
use crate::target::Target;

/// A release is one round; this only guards against a stalled minority
/// holding up the exit (what it does not finish, the TTL does).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// How the command's run ended.
enum Ending {
    Exited(ExitStatus),
    Lost,
    /// The lock is still valid, but for less than the stop margin: its extends
    /// have been failing, and the command must stop before the validity ends.
    AtRisk,
    Signal(i32),
    /// `--max-hold` has passed.
    MaxHold,
}

/// The exit code after `--max-hold` stopped the command, as timeout(1)'s.
const MAX_HOLD_EXIT: u8 = 124;

pub async fn run(target: &Target, args: &RunArgs) -> Result<u8, CliError> {
    // Before anything slow, so that Ctrl-C during the wait is ours to handle.
    let mut signals = Signals::install()?;
    target.prepare().await?;
    let request = target
        .locker
        .lock(args.key.as_str())
        .ttl(args.ttl)
        .wait(args.wait)
        .metadata(metadata(args));
    let take = async {
        match args.semaphore {
            Some(permits) => target
                .locker
                .semaphore(args.key.as_str(), permits)
                .ttl(args.ttl)
                .wait(args.wait)
                .metadata(metadata(args))
                .acquire()
                .await
                .map(Permit::into_lock),
            None => request.acquire().await,
        }
    };
    let acquired = tokio::select! {
        acquired = take => acquired,
        signo = signals.recv() => {
            // The dropped attempt rolls itself back; main settles before exiting.
            notice!(
                "{} while waiting for lock {:?}: the command was not run",
                child::name(signo),
                args.key
            );
            return Ok(child::signal_exit_code(signo));
        }
    };
    let lock = match acquired {
        Ok(lock) => lock,
        Err(err) => return Err(not_acquired(target, args, err).await),
    };
    // As `auto_extend`, spelled out: the stop margin depends on the interval.
    let every = extend_every(&lock);
    let margin = stop_margin(
        args.grace,
        lock.valid_until()
            .saturating_duration_since(lock.acquired_at()),
        every,
    );
    // `check` made the same watchdog on the same TTL: this does not fail.
    let guard = lock
        .auto_extend_every(every)
        .map_err(|err| CliError::context("keeping the lock extended", err))?;
    let held = guard.status();

    let mut child = match child::spawn(&args.command, args.keep_env) {
        Ok(child) => child,
        Err(err) => {
            release(guard).await;
            return Err(err);
        }
    };
    let mut told_stopped = false;
    let hold_until = args
        .max_hold
        .and_then(|max_hold| held.acquired_at().checked_add(max_hold));
    // Loss first: a command that ends as the lock goes did not finish under it.
    let ending = loop {
        // A healthy lock's validity never gets this close to its end: each
        // extend moves the end on before then.
        let at_risk = held
            .valid_until()
            .checked_sub(margin)
            .unwrap_or_else(Instant::now);
        tokio::select! {
            biased;
            () = guard.lost() => break Ending::Lost,
            signo = signals.recv() => break Ending::Signal(signo),
            event = child.watch() => match event? {
                Event::Exited(exited) => break Ending::Exited(exited),
                // Once: a stopped command is no news the second time.
                Event::Stopped(signo) if !told_stopped => {
                    told_stopped = true;
                    notice!("{}", child.stopped(signo));
                }
                Event::Stopped(_) => {}
            },
            () = tokio::time::sleep_until(hold_until.unwrap_or_else(Instant::now)), if hold_until.is_some() => {
                break Ending::MaxHold;
            }
            () = tokio::time::sleep_until(at_risk), if !margin.is_zero() => {
                if held.valid_until() <= Instant::now() + margin {
                    break Ending::AtRisk;
                }
            }
        }
    };
    match ending {
        Ending::Exited(exited) => {
            release(guard).await;
            Ok(child::exit_code(exited))
        }
        Ending::MaxHold => {
            notice!(
                "lock {:?} held for --max-hold: stopping the command ({}), then releasing it",
                args.key,
                child::stopping(args.grace, &held)
            );
            // The lock stays held (and extended) while the command stops.
            let stopped = child.terminate(args.grace, &held, &mut signals).await;
            release(guard).await;
            stopped?;
            Ok(MAX_HOLD_EXIT)
        }
        Ending::Signal(signo) => {
            notice!(
                "got {}: stopping the command ({}), then releasing lock {:?}",
                child::name(signo),
                child::stopping(args.grace, &held),
                args.key
            );
            // The lock stays held (and extended) while the command stops.
            let stopped = child.terminate(args.grace, &held, &mut signals).await;
            release(guard).await;
            stopped?;
            Ok(child::signal_exit_code(signo))
        }
        Ending::Lost | Ending::AtRisk => {
            let why = if let Ending::Lost = ending {
                notice!(
                    "lock {:?} lost: stopping the command ({})",
                    args.key,
                    child::stopping(args.grace, &held)
                );
                Loss::Lost
            } else {
                let left = held.remaining();
                notice!(
                    "lock {:?} could not be extended, {} of validity left: stopping the \
                     command before its validity runs out ({})",
                    args.key,
                    child::brief(left),
                    child::stopping(args.grace, &held)
                );
                Loss::AtRisk(left)
            };
            let token = guard.token().to_string();
            // The watchdog goes on trying: an extend that gets through gives the
            // command more of --grace.
            let (stopped, now) = tokio::join!(
                child.terminate(args.grace, &held, &mut signals),
                status::observe(target, &args.key)
            );
            // Clears our token from any instance that still has it; if the lock
            // is gone, the outcome does not matter, and if not, it frees it.
            let _ = tokio::time::timeout(RELEASE_TIMEOUT, guard.release()).await;
            Err(lost(args, why, stopped?, &now, &token))
        }
    }
}

/// Checks `run`'s options before anything starts or connects, so that bad
/// input is a usage error (exit 2) whatever state the instances are in, and no
/// lock is taken only to find the TTL too short to keep.
///
/// The library checks a request before its first I/O, but `run` connects first
/// (to fail fast on unreachable instances), and the watchdog's interval is
/// checked only once the lock is held. So the same request, with the same key
/// prefix and drift factor, is made here on an in-process [`MemoryInstance`]:
/// the library's own rules (empty and reserved keys, the TTL's bounds and its
/// drift allowance, metadata length, the interval), none copied here, and no
/// new public API for them. `--grace` is qlock's own.
pub async fn check(instances: &InstanceArgs, args: &RunArgs) -> Result<(), CliError> {
    if args.grace > MAX_TTL {
        return Err(CliError::usage(format!(
            "--grace {}: longer than quorumlock::MAX_TTL",
            humantime::format_duration(args.grace)
        )));
    }
    let refused = |err| refused(instances, args, err);
    let memory = MemoryInstance::new("check");
    let mut builder = QuorumLocker::builder()
        .memory(&memory)
        .key_prefix(instances.key_prefix.clone())
        .default_wait(args.wait);
    if let Some(factor) = instances.drift_factor {
        builder = builder.drift_factor(factor);
    }
    if let Some(timeout) = instances.instance_timeout {
        builder = builder.instance_timeout(timeout);
    }
    let locker = builder.build().await.map_err(refused)?;
    let lock = match args.semaphore {
        Some(permits) => locker
            .semaphore(args.key.as_str(), permits)
            .ttl(args.ttl)
            .metadata(metadata(args))
            .try_acquire()
            .await
            .map(Permit::into_lock),
        None => {
            locker
                .lock(args.key.as_str())
                .ttl(args.ttl)
                .metadata(metadata(args))
                .try_acquire()
                .await
        }
    }
    .map_err(refused)?;
    let every = extend_every(&lock);
    let guard = lock.auto_extend_every(every).map_err(refused)?;
    let _ = guard.release().await;
    Ok(())
}

/// An option the library refused, named as the command line spells it.
fn refused(instances: &InstanceArgs, args: &RunArgs, err: Error) -> CliError {
    let ttl = humantime::format_duration(args.ttl);
    let drift = instances
        .drift_factor
        .map(|factor| format!(" (with --drift-factor {factor})"))
        .unwrap_or_default();
    let message = match &err {
        Error::EmptyKey | Error::ReservedKey { .. } | Error::KeyNotForCluster { .. } => {
            format!("--key {:?}: {err}", args.key)
        }
        Error::InvalidTtl { reason, .. } => format!("--ttl {ttl}: {reason}{drift}"),
        Error::InvalidConfig { setting, reason } => match *setting {
            "auto_extend_every" => format!(
                "--ttl {ttl} is too short for qlock to keep the lock, extending it every third \
                 of the TTL: {reason}{drift}"
            ),
            "metadata" => format!("--metadata: {reason}"),
            "permits" => format!("--semaphore: {reason}"),
            // "{wait:?} is longer than quorumlock::MAX_TTL", in qlock's units.
            "default_wait" => format!(
                "--wait {}: longer than quorumlock::MAX_TTL",
                humantime::format_duration(args.wait)
            ),
            "drift_factor" => format!("--drift-factor: {reason}"),
            "instance_timeout" => format!("--instance-timeout: {reason}"),
            _ => return CliError::context("checking the options", err),
        },
        _ => return CliError::context("checking the options", err),
    };
    CliError::usage(message)
}

/// The watchdog's interval: a third of the TTL as sent, as `auto_extend`'s.
fn extend_every(lock: &Lock) -> Duration {
    lock.ttl() / 3
}

fn metadata(args: &RunArgs) -> String {
    args.metadata
        .clone()
        .unwrap_or_else(|| default_metadata(&args.command))
}

/// `qlock pid=4242 host=build-7 cmd=backup.sh`: who holds the lock, for
/// `qlock status` and `redis-cli GET`.
fn default_metadata(command: &[OsString]) -> String {
    let mut metadata = format!("qlock pid={}", std::process::id());
    if let Some(host) = child::hostname() {
        metadata.push_str(&format!(" host={host}"));
    }
    if let Some(program) = command.first() {
        let name = Path::new(program)
            .file_name()
            .unwrap_or(program.as_os_str());
        metadata.push_str(&format!(" cmd={}", name.to_string_lossy()));
    }
    metadata
}

/// How little validity may be left before the command must start stopping:
/// `--grace`, or less when a healthy lock could come that close.
///
/// A healthy lock's validity, `validity` long after each extend, is extended
/// every `every`: what is left never drops much below `validity − every`
/// (about two thirds of the TTL with the default drift factor). Half of that
/// (about a third of the TTL) is left only when extends have failed for about
/// one interval past the one that was due: the watchdog retries until the
/// validity ends, but the command must start stopping now to be gone by then.
fn stop_margin(grace: Duration, validity: Duration, every: Duration) -> Duration {
    grace.min(validity.saturating_sub(every) / 2)
}

/// The wait expired (exit 75), or too few instances answered (exit 1).
async fn not_acquired(target: &Target, args: &RunArgs, err: Error) -> CliError {
    let locker = &target.locker;
    let Error::NotAcquired { .. } = err else {
        return CliError::context("acquiring the lock", err);
    };
    if err.unreachable_instances() > locker.instances() - locker.quorum() {
        return target.unreachable(&err);
    }
    if let Some(permits) = args.semaphore {
        return CliError::new(
            code::WAIT_EXPIRED,
            format!(
                "no permit of semaphore {:?} ({permits} permits) free within {}",
                args.key,
                humantime::format_duration(args.wait)
            ),
        );
    }
    let observations = status::observe(target, &args.key).await;
    let why = match status::verdict(&observations, locker.quorum()) {
        Verdict::Held { value, ttl, .. } => format!(
            "held by {}, {}",
            status::describe_value(&value),
            status::describe_ttl(ttl)
        ),
        Verdict::NotHeld | Verdict::Unknown => err.to_string(),
    };
    CliError::new(
        code::WAIT_EXPIRED,
        format!(
            "lock {:?} not acquired within {}: {why}",
            args.key,
            humantime::format_duration(args.wait)
        ),
    )
}

/// Why the command was stopped under exit code 74.
enum Loss {
    Lost,
    /// The extends failed with this much validity left.
    AtRisk(Duration),
}

/// The lock-lost error: what the instances hold now, and how the command ended.
fn lost(
    args: &RunArgs,
    why: Loss,
    stopped: ExitStatus,
    now: &[Observation],
    token: &str,
) -> CliError {
    let (mut ours, mut others, mut free, mut unreachable) = (0, 0, 0, 0);
    for observation in now {
        match &observation.seen {
            Seen::Held { value, .. } => {
                if status::token_of(value) == Some(token) {
                    ours += 1;
                } else {
                    others += 1;
                }
            }
            Seen::Free => free += 1,
            Seen::Unreachable(_) => unreachable += 1,
        }
    }
    let counts: Vec<String> = [
        (others, "held by another owner"),
        (free, "free"),
        (unreachable, "unreachable"),
        (ours, "still ours"),
    ]
    .iter()
    .filter(|(count, _)| *count > 0)
    .map(|(count, state)| format!("{state} on {count}"))
    .collect();
    let (what, stopped_with) = match why {
        Loss::Lost => ("was lost", String::new()),
        Loss::AtRisk(left) => (
            "could not be extended",
            format!(", stopped with {} of validity left,", child::brief(left)),
        ),
    };
    CliError::new(
        code::LOCK_LOST,
        format!(
            "lock {:?} {what} while the command ran (of {} instance(s), the key is now {}); \
             the command{stopped_with} {}",
            args.key,
            now.len(),
            counts.join(", "),
            child::describe(stopped)
        ),
    )
}

async fn release(guard: LockGuard) {
    let key = guard.key().to_string();
    match tokio::time::timeout(RELEASE_TIMEOUT, guard.release()).await {
        Ok(Ok(_)) => {}
        Ok(Err(err)) => notice!(
            "warning: lock {key:?} not released: {}",
            one_line(&err.to_string())
        ),
        Err(_) => notice!(
            "warning: releasing lock {key:?} took over {}; what is left expires by its TTL",
            humantime::format_duration(RELEASE_TIMEOUT)
        ),
    }
}
