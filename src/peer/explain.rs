//! Which connection failures may mean the peer speaks another protocol, and
//! the one line that says so: apart from the peer, as pure functions of an
//! error and of what the port was found to speak.

use std::io;
use std::sync::Arc;

use redis::{ErrorKind, RedisError};

use super::sniff::{quote, Speaks};

/// What an error needs before it can be explained.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Cause {
    /// It says what it means, or is not about the protocol.
    Leave,
    /// It can be put plainly without asking the server (TLS errors).
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    Known(String),
    /// The peer may not speak what the URL says: ask it.
    Ask,
}

/// A failure [`Peer::explain`] put in words: the peer is not what the URL
/// says, or TLS failed. Trying again will not help.
///
/// [`Peer::explain`]: super::Peer::explain
#[derive(Debug)]
pub(super) struct Explained(pub(super) String);

impl std::fmt::Display for Explained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Explained {}

/// Whether `err` is one [`Peer::explain`] put in words.
///
/// [`Peer::explain`]: super::Peer::explain
pub(crate) fn is_explained(err: &RedisError) -> bool {
    io_error(err)
        .and_then(io::Error::get_ref)
        .is_some_and(|inner| inner.is::<Explained>())
}

/// Sorts an error by what it takes to explain it; `tls`: the URL's scheme.
pub(super) fn classify(err: &RedisError, tls: bool, client_cert: bool) -> Cause {
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
pub(super) fn verdict(speaks: &Speaks, tls: bool, err: &RedisError) -> Option<String> {
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

/// An error's text on one line: any run of whitespace, newlines included,
/// as one space.
pub(crate) fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::tests::io;

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
}
