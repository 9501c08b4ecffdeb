//! What the server at an instance's address speaks, asked when a connection to
//! it fails the way a wrong protocol does: TLS against a plain Redis port (the
//! handshake just hangs), plain Redis against a TLS port (reset), or something
//! that is not Redis at all (its reply does not parse). The error then says so
//! in one line instead of "timed out" or "Incompatible type - Parse error".
//!
//! Here, the peer and its cached answer; in `explain`, which failures may be a
//! wrong protocol and the words for them; in `sniff`, asking the port and
//! reading its reply.

mod explain;
mod sniff;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use redis::{ErrorKind, RedisError};
use tokio::time::Instant;

use self::explain::{classify, verdict, Cause, Explained};
pub(crate) use self::explain::{is_explained, one_line};
use self::sniff::{sniff, Speaks};

/// How long asking the peer may take, both questions together.
pub(crate) const SNIFF_TIMEOUT: Duration = Duration::from_millis(250);
/// How long an answer is reused: failures come in bursts (every request on a
/// connection that failed), one question per burst is enough.
const SNIFF_FRESH: Duration = Duration::from_secs(1);

/// One instance's address and what was learnt about it.
pub(crate) struct Peer {
    host: String,
    port: u16,
    tls: bool,
    client_cert: bool,
    /// Set once the server answered anything: it speaks our protocol, and
    /// later failures are faults, reported as they are (and at once).
    answered: AtomicBool,
    last: Mutex<Option<(Instant, Speaks)>>,
    /// One question at a time; the others wait for its answer.
    asking: tokio::sync::Mutex<()>,
}

impl Peer {
    /// `tls`: whether the URL is `rediss://`; `client_cert`: whether a client
    /// certificate is presented.
    pub(crate) fn new(host: String, port: u16, tls: bool, client_cert: bool) -> Self {
        Self {
            host,
            port,
            tls,
            client_cert,
            answered: AtomicBool::new(false),
            last: Mutex::new(None),
            asking: tokio::sync::Mutex::new(()),
        }
    }

    /// The server answered a request.
    pub(crate) fn answered(&self) {
        if !self.answered.load(Ordering::Relaxed) {
            self.answered.store(true, Ordering::Relaxed);
        }
    }

    /// `err`, or an error that says in one line what is wrong with the peer.
    /// May ask the peer, for at most [`SNIFF_TIMEOUT`], but only while it has
    /// never answered.
    pub(crate) async fn explain(&self, err: RedisError) -> RedisError {
        if matches!(
            err.kind(),
            ErrorKind::Server(_) | ErrorKind::AuthenticationFailed
        ) {
            self.answered();
        }
        let message = match classify(&err, self.tls, self.client_cert) {
            Cause::Leave => return err,
            Cause::Known(message) => message,
            Cause::Ask if self.answered.load(Ordering::Relaxed) => return err,
            Cause::Ask => match verdict(&self.speaks().await, self.tls, &err) {
                Some(message) => message,
                None => return err,
            },
        };
        RedisError::from(io::Error::new(
            io::ErrorKind::InvalidData,
            Explained(message),
        ))
    }

    async fn speaks(&self) -> Speaks {
        let fresh = || {
            let last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
            last.as_ref()
                .filter(|(at, _)| at.elapsed() < SNIFF_FRESH)
                .map(|(_, speaks)| speaks.clone())
        };
        if let Some(speaks) = fresh() {
            return speaks;
        }
        let _asking = self.asking.lock().await;
        if let Some(speaks) = fresh() {
            return speaks;
        }
        let speaks = tokio::time::timeout(SNIFF_TIMEOUT, sniff(&self.host, self.port))
            .await
            .unwrap_or(Speaks::Unknown);
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((Instant::now(), speaks.clone()));
        speaks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    pub(super) fn io(kind: io::ErrorKind) -> RedisError {
        RedisError::from(io::Error::new(kind, "boom"))
    }

    /// A loopback port that answers every connection with `reply` (after the
    /// first read), or closes it at once when `reply` is empty.
    pub(super) async fn answering(reply: &'static [u8]) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = [0; 512];
                    let _ = stream.read(&mut request).await;
                    let _ = stream.write_all(reply).await;
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn a_peer_that_answered_once_is_not_asked_again() {
        let port = answering(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        let peer = Peer::new("127.0.0.1".into(), port, false, false);
        let parse = || RedisError::from((ErrorKind::Parse, "parse error"));
        let explained = peer.explain(parse()).await.to_string();
        assert!(
            explained.starts_with("not a Redis server: it answered PING"),
            "{explained}"
        );
        peer.answered();
        let reset = peer.explain(io(io::ErrorKind::ConnectionReset)).await;
        assert_eq!(reset.to_string(), "boom");
    }
}
