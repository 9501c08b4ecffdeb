//! What the server at an instance's address speaks, asked when a connection to
//! it fails the way a wrong protocol does: TLS against a plain Redis port (the
//! handshake just hangs), plain Redis against a TLS port (reset), or something
//! that is not Redis at all (its reply does not parse). The error then says so
//! in one line instead of "timed out" or "Incompatible type - Parse error".

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::{ErrorKind, RedisError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long asking the peer may take, both questions together.
pub(crate) const SNIFF_TIMEOUT: Duration = Duration::from_millis(250);
/// How long an answer is reused: failures come in bursts (every request on a
/// connection that failed), one question per burst is enough.
const SNIFF_FRESH: Duration = Duration::from_secs(1);
/// Enough of a reply to recognise it and quote its first line.
const SNIFF_READ: usize = 64;
/// The longest part of a reply quoted in an error.
const QUOTE_MAX: usize = 48;

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

/// What a port answered to a plain `PING` and, if it closed, to a TLS hello.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Speaks {
    Redis,
    Tls,
    /// The first bytes of a reply that is neither.
    Other(Vec<u8>),
    /// No answer, or no connection: nothing to add to the error.
    Unknown,
}

/// What an error needs before it can be explained.
#[derive(Debug, PartialEq, Eq)]
enum Cause {
    /// It says what it means, or is not about the protocol.
    Leave,
    /// It can be put plainly without asking the server (TLS errors).
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    Known(String),
    /// The peer may not speak what the URL says: ask it.
    Ask,
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

/// A failure [`Peer::explain`] put in words: the peer is not what the URL
/// says, or TLS failed. Trying again will not help.
#[derive(Debug)]
struct Explained(String);

impl std::fmt::Display for Explained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Explained {}

/// Whether `err` is one [`Peer::explain`] put in words.
pub(crate) fn is_explained(err: &RedisError) -> bool {
    io_error(err)
        .and_then(io::Error::get_ref)
        .is_some_and(|inner| inner.is::<Explained>())
}

/// Sorts an error by what it takes to explain it; `tls`: the URL's scheme.
fn classify(err: &RedisError, tls: bool, client_cert: bool) -> Cause {
    if err.kind() == ErrorKind::Parse {
        return Cause::Ask;
    }
    let Some(io) = io_error(err) else {
        return if err.is_connection_dropped() {
            Cause::Ask
        } else {
            Cause::Leave
        };
    };
    #[cfg(feature = "tls")]
    if let Some(cause) = io
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .map(|tls_err| classify_tls(tls_err, client_cert))
    {
        return cause;
    }
    #[cfg(not(feature = "tls"))]
    let _ = client_cert;
    match io.kind() {
        // A TLS hello to a plain Redis port waits for a newline that never comes.
        io::ErrorKind::TimedOut if tls => Cause::Ask,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::UnexpectedEof
        | io::ErrorKind::BrokenPipe => Cause::Ask,
        _ => Cause::Leave,
    }
}

#[cfg(feature = "tls")]
fn classify_tls(err: &rustls::Error, client_cert: bool) -> Cause {
    use rustls::{AlertDescription as Alert, CertificateError};
    match err {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => Cause::Known(
            "TLS: the server's certificate is not signed by a trusted CA (UnknownIssuer): give \
             its CA with tls_ca_file (qlock: --tls-ca)"
                .to_string(),
        ),
        rustls::Error::InvalidCertificate(_) => {
            Cause::Known(format!("TLS: the server's certificate was refused: {err}"))
        }
        rustls::Error::AlertReceived(Alert::CertificateRequired) => Cause::Known(
            "TLS: the server requires a client certificate (tls-auth-clients): give one with \
             tls_client_cert_files (qlock: --tls-cert and --tls-key)"
                .to_string(),
        ),
        rustls::Error::AlertReceived(
            alert @ (Alert::UnknownCA
            | Alert::BadCertificate
            | Alert::DecryptError
            | Alert::CertificateUnknown
            | Alert::UnsupportedCertificate
            | Alert::CertificateExpired
            | Alert::CertificateRevoked
            | Alert::AccessDenied),
        ) if client_cert => Cause::Known(format!(
            "TLS: the server refused our client certificate ({alert:?}): it must be signed by a \
             CA in the server's tls-ca-cert-file"
        )),
        // Not TLS records: the port speaks something else.
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => Cause::Ask,
        _ => Cause::Leave,
    }
}

/// The I/O error inside a redis-rs error, if it is one.
fn io_error(err: &RedisError) -> Option<&io::Error> {
    let source = std::error::Error::source(err)?;
    // redis-rs keeps it behind an `Arc`.
    source.downcast_ref::<io::Error>().or_else(|| {
        source
            .downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>()
            .and_then(|inner| inner.downcast_ref::<io::Error>())
    })
}

/// The one-line explanation, when what the peer speaks contradicts the URL.
fn verdict(speaks: &Speaks, tls: bool, err: &RedisError) -> Option<String> {
    match speaks {
        Speaks::Other(reply) => Some(format!(
            "not a Redis server: it answered PING with {}",
            quote(reply)
        )),
        Speaks::Tls if !tls => Some(format!(
            "the server speaks TLS on this port: use rediss://{}",
            if cfg!(feature = "tls") {
                ""
            } else {
                " (quorumlock's `tls` feature)"
            }
        )),
        Speaks::Redis if tls => Some(
            "the server speaks plain Redis on this port, not TLS: use redis://, or the port of \
             its tls-port setting"
                .to_string(),
        ),
        // The reply did not parse, and a second look found nothing more.
        _ if err.kind() == ErrorKind::Parse => Some(format!(
            "not a Redis server: its reply is not the Redis protocol ({})",
            one_line(&err.to_string())
        )),
        _ => None,
    }
}

/// Asks the port a plain `PING`; if it closes the connection without a word,
/// sends a TLS hello, which a TLS server answers.
async fn sniff(host: &str, port: u16) -> Speaks {
    match exchange(host, port, b"*1\r\n$4\r\nPING\r\n").await {
        Some(reply) if is_tls_record(&reply) => Speaks::Tls,
        Some(reply) if is_resp(&reply) => Speaks::Redis,
        Some(reply) if !reply.is_empty() => Speaks::Other(reply),
        Some(_) => match exchange(host, port, &client_hello()).await {
            Some(reply) if is_tls_record(&reply) => Speaks::Tls,
            _ => Speaks::Unknown,
        },
        None => Speaks::Unknown,
    }
}

/// Sends `request` on a new connection and reads the start of the reply:
/// empty if the peer closed (or reset) the connection first, `None` if it
/// could not be reached.
async fn exchange(host: &str, port: u16, request: &[u8]) -> Option<Vec<u8>> {
    let mut stream = TcpStream::connect((host, port)).await.ok()?;
    let _ = stream.set_nodelay(true);
    if stream.write_all(request).await.is_err() {
        return Some(Vec::new());
    }
    let mut reply = vec![0; SNIFF_READ];
    let mut filled = 0;
    while filled < reply.len() && !reply[..filled].contains(&b'\n') {
        match stream.read(&mut reply[filled..]).await {
            Ok(0) | Err(_) => break,
            Ok(read) => filled += read,
        }
        // A TLS record header is five bytes; more is not needed.
        if is_tls_record(&reply[..filled]) {
            break;
        }
    }
    reply.truncate(filled);
    Some(reply)
}

/// A TLS record header: handshake (22) or alert (21), version 3.x.
fn is_tls_record(reply: &[u8]) -> bool {
    matches!(reply, [21 | 22, 3, ..])
}

/// A RESP simple string or error, as a Redis-protocol server answers PING
/// (`+PONG`, `-NOAUTH …`, `-DENIED …` in protected mode).
fn is_resp(reply: &[u8]) -> bool {
    let line = reply
        .split(|byte| *byte == b'\r')
        .next()
        .unwrap_or_default();
    matches!(reply.first(), Some(b'+' | b'-'))
        && line
            .iter()
            .all(|byte| byte.is_ascii_graphic() || *byte == b' ')
}

/// The reply's first line, quoted, with bytes that are not printable escaped.
fn quote(reply: &[u8]) -> String {
    let line = reply
        .split(|byte| *byte == b'\r' || *byte == b'\n')
        .next()
        .unwrap_or_default();
    let shown = &line[..line.len().min(QUOTE_MAX)];
    let more = if line.len() > QUOTE_MAX || line.len() < reply.len() {
        "…"
    } else {
        ""
    };
    format!("\"{}\"{more}", shown.escape_ascii())
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A minimal TLS 1.2 ClientHello, enough for any TLS server to answer with a
/// ServerHello or an alert: either starts with a TLS record header, which is
/// all that is read.
fn client_hello() -> Vec<u8> {
    let mut body = vec![3, 3]; // client version: TLS 1.2
    body.extend([0x5a; 32]); // random: nothing is negotiated
    body.push(0); // no session id
                  // TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384,
                  // ECDHE-RSA-AES128-GCM-SHA256, ECDHE-ECDSA-AES128-GCM-SHA256.
    body.extend([0, 8, 0x13, 0x01, 0x13, 0x02, 0xc0, 0x2f, 0xc0, 0x2b]);
    body.extend([1, 0]); // compression: none
    let extensions = [
        0, 10, 0, 4, 0, 2, 0, 23, // supported_groups: secp256r1
        0, 11, 0, 2, 1, 0, // ec_point_formats: uncompressed
        0, 13, 0, 6, 0, 4, 4, 1, 4, 3, // signature_algorithms: RSA and ECDSA with SHA-256
    ];
    body.extend((extensions.len() as u16).to_be_bytes());
    body.extend(extensions);
    let mut handshake = vec![1]; // ClientHello
    handshake.extend(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend(body);
    let mut record = vec![22, 3, 1]; // handshake record, TLS 1.0 for compatibility
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn io(kind: io::ErrorKind) -> RedisError {
        RedisError::from(io::Error::new(kind, "boom"))
    }

    #[test]
    fn errors_that_may_be_a_wrong_protocol_are_asked_about() {
        let parse = RedisError::from((ErrorKind::Parse, "parse error"));
        assert_eq!(classify(&parse, false, false), Cause::Ask);
        assert_eq!(
            classify(&io(io::ErrorKind::ConnectionReset), false, false),
            Cause::Ask
        );
        assert_eq!(
            classify(&io(io::ErrorKind::UnexpectedEof), true, false),
            Cause::Ask
        );
        assert_eq!(
            classify(&io(io::ErrorKind::TimedOut), true, false),
            Cause::Ask
        );
        // A plain connection that times out is a stalled server, not a protocol.
        assert_eq!(
            classify(&io(io::ErrorKind::TimedOut), false, false),
            Cause::Leave
        );
        assert_eq!(
            classify(&io(io::ErrorKind::ConnectionRefused), true, false),
            Cause::Leave
        );
        let server = RedisError::from((ErrorKind::Server(redis::ServerErrorKind::ReadOnly), "x"));
        assert_eq!(classify(&server, false, false), Cause::Leave);
    }

    #[cfg(feature = "tls")]
    #[test]
    fn tls_errors_are_put_plainly() {
        use rustls::{AlertDescription, CertificateError};
        let tls =
            |err: rustls::Error| RedisError::from(io::Error::new(io::ErrorKind::InvalidData, err));
        let untrusted = tls(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ));
        let Cause::Known(message) = classify(&untrusted, true, false) else {
            panic!("not explained");
        };
        assert!(message.contains("not signed by a trusted CA"), "{message}");
        let required = tls(rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired,
        ));
        let Cause::Known(message) = classify(&required, true, false) else {
            panic!("not explained");
        };
        assert!(
            message.contains("requires a client certificate"),
            "{message}"
        );
        let unknown_ca = tls(rustls::Error::AlertReceived(AlertDescription::UnknownCA));
        assert!(
            matches!(classify(&unknown_ca, true, true), Cause::Known(m) if m.contains("refused our client certificate"))
        );
        assert_eq!(classify(&unknown_ca, true, false), Cause::Leave);
        let corrupt = tls(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType,
        ));
        assert_eq!(classify(&corrupt, true, false), Cause::Ask);
    }

    #[test]
    fn verdicts_name_the_protocol_spoken() {
        let reset = io(io::ErrorKind::ConnectionReset);
        let tls = verdict(&Speaks::Tls, false, &reset).unwrap();
        assert!(
            tls.starts_with("the server speaks TLS on this port"),
            "{tls}"
        );
        assert_eq!(verdict(&Speaks::Tls, true, &reset), None);
        let plain = verdict(&Speaks::Redis, true, &reset).unwrap();
        assert!(plain.contains("plain Redis"), "{plain}");
        assert_eq!(verdict(&Speaks::Redis, false, &reset), None);
        assert_eq!(verdict(&Speaks::Unknown, false, &reset), None);
        let http = verdict(
            &Speaks::Other(b"HTTP/1.1 400 Bad Request\r\n".to_vec()),
            false,
            &reset,
        );
        assert_eq!(
            http.as_deref(),
            Some("not a Redis server: it answered PING with \"HTTP/1.1 400 Bad Request\"…")
        );
        let parse = RedisError::from((ErrorKind::Parse, "Parse error at 1\nUnexpected `72`"));
        let fallback = verdict(&Speaks::Unknown, false, &parse).unwrap();
        assert!(fallback.starts_with("not a Redis server:") && !fallback.contains('\n'));
    }

    #[test]
    fn replies_are_recognised_and_quoted() {
        assert!(is_resp(b"+PONG\r\n"));
        assert!(is_resp(b"-NOAUTH Authentication required.\r\n"));
        assert!(!is_resp(b"HTTP/1.1 400 Bad Request\r\n"));
        assert!(!is_resp(b"-\x00\x01"));
        assert!(is_tls_record(&[21, 3, 3, 0, 2, 2, 70]));
        assert!(is_tls_record(&client_hello()));
        assert!(!is_tls_record(b"+PONG\r\n"));
        assert_eq!(quote(b"\x9c\x01\xffB"), "\"\\x9c\\x01\\xffB\"");
        let long = [b'a'; 100];
        assert_eq!(quote(&long), format!("\"{}\"…", "a".repeat(QUOTE_MAX)));
        let hello = client_hello();
        assert_eq!(
            usize::from(u16::from_be_bytes([hello[3], hello[4]])),
            hello.len() - 5
        );
    }

    /// A loopback port that answers every connection with `reply` (after the
    /// first read), or closes it at once when `reply` is empty.
    async fn answering(reply: &'static [u8]) -> u16 {
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
    async fn sniffing_tells_redis_tls_and_others_apart() {
        let cases: [(&'static [u8], &str); 4] = [
            (b"+PONG\r\n", "Redis"),
            (
                b"HTTP/1.1 400 Bad Request\r\n\r\n",
                "\"HTTP/1.1 400 Bad Request\"…",
            ),
            (&[21, 3, 3, 0, 2, 2, 70], "Tls"),
            (b"", "Unknown"),
        ];
        for (reply, expected) in cases {
            let port = answering(reply).await;
            let speaks = match sniff("127.0.0.1", port).await {
                Speaks::Other(reply) => quote(&reply),
                other => format!("{other:?}"),
            };
            assert_eq!(speaks, expected, "{reply:?}");
        }
        // Nobody listening.
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert_eq!(sniff("127.0.0.1", port).await, Speaks::Unknown);
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
