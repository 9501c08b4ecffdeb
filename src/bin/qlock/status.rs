//! `qlock status`: raw, read-only looks at a key on every instance.

use std::collections::HashMap;
use std::fmt::Write;
use std::time::Duration;

use futures_util::future::join_all;
use quorumlock::LockValue;

use crate::args::StatusArgs;
use crate::error::{code, one_line, print, CliError};
use crate::target::Target;

/// Connecting plus one round trip; generous, since this is for people.
const READ_TIMEOUT: Duration = Duration::from_secs(1);

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

/// Reads the key on every instance in parallel, on connections of its own (the
/// locker's are not public), with GET and PTTL in one MULTI.
pub async fn observe(target: &Target, key: &str) -> Vec<Observation> {
    let redis_key = target.redis_key(key);
    let addresses: Vec<&str> = target.locker.addresses().collect();
    let reads = target.urls.iter().enumerate().map(|(index, url)| {
        let (redis_key, addresses) = (&redis_key, &addresses);
        async move {
            let read = async {
                // The locker's client: the URL with the TLS settings given.
                let client = match target.locker.redis_client(index) {
                    Some(client) => client,
                    None => redis::Client::open(url.as_str())?,
                };
                let mut connection = client.get_multiplexed_async_connection().await?;
                redis::pipe()
                    .atomic()
                    .cmd("GET")
                    .arg(redis_key)
                    .cmd("PTTL")
                    .arg(redis_key)
                    .query_async::<(Option<Vec<u8>>, i64)>(&mut connection)
                    .await
            };
            let seen = match tokio::time::timeout(READ_TIMEOUT, read).await {
                Ok(Ok((None, _))) => Seen::Free,
                Ok(Ok((Some(value), pttl))) => Seen::Held {
                    value: String::from_utf8_lossy(&value).into_owned(),
                    ttl: u64::try_from(pttl).ok().map(Duration::from_millis),
                },
                Ok(Err(err)) => Seen::Unreachable(one_line(&err.to_string())),
                Err(_) => Seen::Unreachable(format!("no answer within {READ_TIMEOUT:?}")),
            };
            Observation {
                index,
                // The locker's addresses have passwords redacted; the URLs do not.
                address: addresses
                    .get(index)
                    .map_or_else(|| format!("#{index}"), ToString::to_string),
                seen,
            }
        }
    });
    join_all(reads).await
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
    if args.key.is_empty() {
        return Err(quorumlock::Error::EmptyKey.into());
    }
    let observations = observe(target, &args.key).await;
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
