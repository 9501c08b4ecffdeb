//! Inspection: what a key holds on every instance, read-only, for people and
//! tools (`qlock status`); and the administrator's forced release built on it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;

use crate::instance::connect::CHECK_TIMEOUT;
use crate::instance::{Peeked, Request};
use crate::peer::one_line;
use crate::shared::Shared;
use crate::token;
use crate::value::LockValue;

/// What a key holds on every instance, as read by
/// [`QuorumLocker::inspect`](crate::QuorumLocker::inspect).
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::time::Duration;
/// use quorumlock::{MemoryInstance, QuorumLocker};
///
/// let (a, b, c) = (MemoryInstance::new("a"), MemoryInstance::new("b"), MemoryInstance::new("c"));
/// let locker = QuorumLocker::builder().memory(&a).memory(&b).memory(&c).build().await?;
/// let lock = locker.lock("export").metadata("host=worker-7").acquire().await?;
///
/// let seen = locker.inspect("export").await?;
/// assert_eq!(seen.holder(), Some(lock.token()));
/// let on_a = seen.instances()[0].holding().expect("held on a");
/// assert_eq!(on_a.metadata(), Some("host=worker-7"));
/// println!("{seen}"); // one line per instance: holder, metadata, TTL left
/// # Ok::<_, quorumlock::Error>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct Inspection {
    key: String,
    quorum: usize,
    instances: Vec<KeyOnInstance>,
}

/// What one instance holds under the key.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct KeyOnInstance {
    /// The instance's position in the order given to the builder.
    pub index: usize,
    /// Its address (password redacted) or name.
    pub address: Arc<str>,
    /// What it holds: `Ok(None)` where the key is free; `Err` with the reason,
    /// on one line, where it did not answer.
    pub read: Result<Option<Holding>, String>,
}

/// A value held under the key on one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Holding {
    /// As stored: `token nonce [metadata]` for a quorumlock lock.
    pub value: String,
    /// The TTL left on the instance's clock; `None` for a key without expiry
    /// (not set by quorumlock).
    pub ttl: Option<Duration>,
}

impl Holding {
    /// The holder's token, where the value is a quorumlock lock's.
    pub fn token(&self) -> Option<&str> {
        LockValue::parse(&self.value).map(|value| value.token)
    }

    /// The holder's metadata, if any.
    pub fn metadata(&self) -> Option<&str> {
        LockValue::parse(&self.value).and_then(|value| value.metadata)
    }
}

impl KeyOnInstance {
    /// What the instance holds, where it answered and the key is held.
    pub fn holding(&self) -> Option<&Holding> {
        self.read.as_ref().ok().and_then(Option::as_ref)
    }
}

impl Inspection {
    /// The key, as given.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Every instance's reading, in order.
    pub fn instances(&self) -> &[KeyOnInstance] {
        &self.instances
    }

    /// The token held on a quorum of instances, if any: who holds the lock by
    /// the instances' say (its validity, on the holder's clock, may already
    /// have run out).
    pub fn holder(&self) -> Option<&str> {
        let tokens: Vec<&str> = self
            .instances
            .iter()
            .filter_map(|instance| instance.holding()?.token())
            .collect();
        tokens
            .iter()
            .copied()
            .find(|token| tokens.iter().filter(|other| *other == token).count() >= self.quorum)
    }
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.holder() {
            Some(holder) => writeln!(
                f,
                "{}: held by {}… on a quorum",
                self.key,
                token::abbreviate(holder)
            )?,
            None => writeln!(f, "{}: not held on a quorum", self.key)?,
        }
        for instance in &self.instances {
            write!(f, "  instance {} ({}): ", instance.index, instance.address)?;
            match &instance.read {
                Err(reason) => writeln!(f, "unreachable: {reason}")?,
                Ok(None) => writeln!(f, "free")?,
                Ok(Some(holding)) => {
                    match holding.token() {
                        Some(token) => write!(f, "held by {}…", token::abbreviate(token))?,
                        None => write!(f, "holds {:?} (not a quorumlock value)", holding.value)?,
                    }
                    if let Some(metadata) = holding.metadata() {
                        write!(f, " ({metadata})")?;
                    }
                    match holding.ttl {
                        Some(ttl) => writeln!(f, ", {ttl:?} left")?,
                        None => writeln!(f, ", no expiry")?,
                    }
                }
            }
        }
        Ok(())
    }
}

/// Reads `redis_key` on every instance in parallel, each bounded by a
/// connection's worth of time: this is for people, not for locking.
pub(crate) async fn inspect(shared: &Shared, key: &str, redis_key: &Arc<str>) -> Inspection {
    let timeout = shared.settings.instance_timeout.max(CHECK_TIMEOUT);
    let reads = shared.members.iter().map(|member| async move {
        let read = match tokio::time::timeout(timeout, member.instance.peek(redis_key)).await {
            Ok(Ok(peeked)) => Ok(peeked.map(|Peeked { value, ttl }| Holding { value, ttl })),
            Ok(Err(err)) => Err(one_line(&err.to_string())),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        };
        KeyOnInstance {
            index: member.index,
            address: Arc::clone(&member.address),
            read,
        }
    });
    Inspection {
        key: key.to_string(),
        quorum: shared.quorum,
        instances: join_all(reads).await,
    }
}

/// Deletes what [`inspect`] saw on each instance, by compare-and-delete of
/// that value: a holder that took the key since is left alone. How many
/// instances deleted.
pub(crate) async fn force_release(
    shared: &Shared,
    seen: &Inspection,
    redis_key: &Arc<str>,
) -> usize {
    let timeout = shared.settings.instance_timeout.max(CHECK_TIMEOUT);
    let deletes = seen.instances.iter().filter_map(|instance| {
        let holding = instance.holding()?;
        let member = shared.members.get(instance.index)?;
        let value: Arc<str> = holding.value.as_str().into();
        Some(async move {
            let release = Request::Release {
                key: redis_key,
                value: &value,
                publish: None,
            };
            let deleted = tokio::time::timeout(timeout, member.instance.eval(&release)).await;
            matches!(deleted, Ok(Ok(n)) if n > 0)
        })
    });
    join_all(deletes)
        .await
        .into_iter()
        .filter(|deleted| *deleted)
        .count()
}
