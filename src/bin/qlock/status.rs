//! `qlock status`: a read-only look at a key on every instance, through the
//! locker's `inspect`.

use std::collections::HashMap;
use std::fmt::Write;
use std::time::Duration;

use quorumlock::LockValue;

use crate::args::StatusArgs;
use crate::error::{code, one_line, print, CliError};
use crate::target::Target;

/// What one instance holds under the key.
pub enum Seen {
    Free,
    Held {
        /// As stored: token, nonce and metadata (see `LockValue`).
        value: String,
        /// `None` when the key has no expiry (not set by quorumlock).
        ttl: Option<Duration>,
    },
    Unreachable(String),
}

pub struct Observation {
    pub index: usize,
    pub address: String,
    pub seen: Seen,
}

/// Reads the key on every instance in parallel, through the locker's own
/// `inspect`; a key no lock can have reads as unreachable everywhere (the
/// callers here have checked it already).
pub async fn observe(target: &Target, key: &str) -> Vec<Observation> {
    match target.locker.inspect(key).await {
        Ok(inspection) => observations(&inspection),
        Err(err) => target
            .locker
            .addresses()
            .enumerate()
            .map(|(index, address)| Observation {
                index,
                address: address.to_string(),
                seen: Seen::Unreachable(one_line(&err.to_string())),
            })
            .collect(),
    }
}

/// The library's inspection in this tool's terms.
fn observations(inspection: &quorumlock::Inspection) -> Vec<Observation> {
    inspection
        .instances()
        .iter()
        .map(|instance| Observation {
            index: instance.index,
            address: instance.address.to_string(),
            seen: match &instance.read {
                Ok(None) => Seen::Free,
                Ok(Some(holding)) => Seen::Held {
                    value: holding.value.clone(),
                    ttl: holding.ttl,
                },
                Err(reason) => Seen::Unreachable(reason.clone()),
            },
        })
        .collect()
}

/// What the instances say together.
pub enum Verdict {
    /// A quorum holds `value`; `ttl` is the shortest PTTL among them.
    Held {
        value: String,
        holders: usize,
        ttl: Option<Duration>,
    },
    /// No value is on a quorum, and the unreachable instances could not change that.
    NotHeld,
    /// No value is on a quorum among those that answered, but with the
    /// unreachable ones it might be.
    Unknown,
}

pub fn verdict(observations: &[Observation], quorum: usize) -> Verdict {
    let mut values: HashMap<&str, (usize, Option<Duration>)> = HashMap::new();
    let mut unreachable = 0;
    for observation in observations {
        match &observation.seen {
            Seen::Held { value, ttl } => {
                let entry = values.entry(value).or_insert((0, None));
                entry.0 += 1;
                entry.1 = shorter(entry.1, *ttl);
            }
            Seen::Free => {}
            Seen::Unreachable(_) => unreachable += 1,
        }
    }
    let best = values
        .into_iter()
        .max_by_key(|(value, (holders, _))| (*holders, *value));
    let holders = best.as_ref().map_or(0, |(_, (holders, _))| *holders);
    match best {
        Some((value, (holders, ttl))) if holders >= quorum => Verdict::Held {
            value: value.to_string(),
            holders,
            ttl,
        },
        _ if holders + unreachable >= quorum => Verdict::Unknown,
        _ => Verdict::NotHeld,
    }
}

/// The shorter of two remaining TTLs; `None` (no expiry) only if both are.
fn shorter(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `3f9a1c… "qlock pid=4242 host=build-7"`: the token abbreviated as the
/// library does in its logs, and the metadata; a value quorumlock did not write
/// is shown whole.
pub fn describe_value(value: &str) -> String {
    let Some(parsed) = LockValue::parse(value) else {
        return format!("{value:?} (not a quorumlock value)");
    };
    let short: String = parsed.token.chars().take(6).collect();
    let ellipsis = if short.len() < parsed.token.len() {
        "…"
    } else {
        ""
    };
    match parsed.metadata {
        Some(metadata) => format!("{short}{ellipsis} {metadata:?}"),
        None => format!("{short}{ellipsis}"),
    }
}

/// The owner's token in a stored value.
pub fn token_of(value: &str) -> Option<&str> {
    LockValue::parse(value).map(|parsed| parsed.token)
}

pub fn describe_ttl(ttl: Option<Duration>) -> String {
    match ttl {
        None => "no expiry".to_string(),
        Some(ttl) if ttl >= Duration::from_secs(1) => format!("{:.1}s left", ttl.as_secs_f64()),
        Some(ttl) => format!("{}ms left", ttl.as_millis()),
    }
}

pub async fn status(target: &Target, args: &StatusArgs) -> Result<u8, CliError> {
    // A bad key (empty, reserved) is the library's typed error.
    let observations = observations(&target.locker.inspect(&args.key).await?);
    let quorum = target.locker.quorum();
    let mut out = String::new();
    let redis_key = target.redis_key(&args.key);
    let _ = write!(out, "lock {:?}", args.key);
    if redis_key != args.key {
        let _ = write!(out, " (key {redis_key:?})");
    }
    let _ = writeln!(
        out,
        " on {} instance(s), quorum {quorum}",
        observations.len()
    );
    for observation in &observations {
        let _ = write!(
            out,
            "instance {} ({}): ",
            observation.index, observation.address
        );
        let _ = match &observation.seen {
            Seen::Free => writeln!(out, "free"),
            Seen::Held { value, ttl } => writeln!(
                out,
                "held by {}, {}",
                describe_value(value),
                describe_ttl(*ttl)
            ),
            Seen::Unreachable(err) => writeln!(out, "unreachable: {err}"),
        };
    }
    let exit = match verdict(&observations, quorum) {
        Verdict::Held {
            value,
            holders,
            ttl,
        } => {
            let _ = writeln!(
                out,
                "held: {holders} of {} instance(s) hold {}, {}",
                observations.len(),
                describe_value(&value),
                describe_ttl(ttl)
            );
            code::OK
        }
        Verdict::NotHeld => {
            let _ = writeln!(out, "not held: no value is on {quorum} or more instance(s)");
            code::NOT_HELD
        }
        Verdict::Unknown => {
            print(&out)?;
            return Err(CliError::failure(format!(
                "cannot tell whether lock {:?} is held: too few instances answered",
                args.key
            )));
        }
    };
    print(&out)?;
    Ok(exit)
}
