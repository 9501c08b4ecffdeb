//! What a lock's key holds in Redis: `token nonce` or `token nonce metadata`.
//!
//! The token says who owns the lock; the nonce is fresh for every attempt, so that
//! the rollback of one attempt can never delete what a later attempt with the same
//! (caller-chosen) token set; the metadata says, to whoever inspects the key, who
//! the owner is. Tokens and nonces contain no spaces, so the format parses one way.

use std::sync::Arc;

use crate::error::Error;

/// Random bytes in a nonce.
const NONCE_BYTES: usize = 4;

/// A lock's stored value, parsed.
///
/// ```
/// use quorumlock::LockValue;
///
/// let value = LockValue::parse("host-a:job-17 9f86d081 pid=4242 started=09:00").unwrap();
/// assert_eq!(value.token, "host-a:job-17");
/// assert_eq!(value.metadata, Some("pid=4242 started=09:00"));
/// assert_eq!(LockValue::parse("no-nonce"), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockValue<'a> {
    /// The owner's token.
    pub token: &'a str,
    /// The attempt's nonce.
    pub nonce: &'a str,
    /// The owner's metadata, if any.
    pub metadata: Option<&'a str>,
}

impl<'a> LockValue<'a> {
    /// Parses what `GET key` returns for a key held by quorumlock; `None` for a
    /// value in another format.
    pub fn parse(value: &'a str) -> Option<Self> {
        let (token, rest) = value.split_once(' ')?;
        let (nonce, metadata) = match rest.split_once(' ') {
            Some((nonce, metadata)) => (nonce, Some(metadata)),
            None => (rest, None),
        };
        (!token.is_empty() && !nonce.is_empty()).then_some(Self {
            token,
            nonce,
            metadata,
        })
    }
}

/// A fresh nonce: 8 hex digits.
pub(crate) fn nonce() -> Result<String, Error> {
    let mut bytes = [0u8; NONCE_BYTES];
    getrandom::fill(&mut bytes).map_err(|err| Error::Entropy(err.to_string()))?;
    Ok(crate::token::hex(&bytes))
}

/// The value for `token`, a fresh nonce, and `metadata`.
pub(crate) fn compose(token: &str, metadata: Option<&str>) -> Result<Arc<str>, Error> {
    let nonce = nonce()?;
    Ok(match metadata {
        Some(metadata) => format!("{token} {nonce} {metadata}"),
        None => format!("{token} {nonce}"),
    }
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composed_values_parse_back() {
        let plain = compose("t0k3n", None).unwrap();
        let parsed = LockValue::parse(&plain).unwrap();
        assert_eq!((parsed.token, parsed.metadata), ("t0k3n", None));
        assert_eq!(parsed.nonce.len(), 8);
        let with = compose("t0k3n", Some("pid=1 host=a")).unwrap();
        let parsed = LockValue::parse(&with).unwrap();
        assert_eq!(parsed.metadata, Some("pid=1 host=a"));
        assert_ne!(compose("t", None).unwrap(), compose("t", None).unwrap());
    }

    #[test]
    fn foreign_values_do_not_parse() {
        for value in ["", "token", " nonce", "token ", "token  meta"] {
            assert_eq!(LockValue::parse(value), None, "{value:?}");
        }
    }
}
