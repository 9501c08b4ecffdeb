//! Asking a port what it speaks: a plain `PING`, then a TLS hello if it closes
//! without a word, and reading the start of the reply. Apart from the
//! explanations, which only need the answer.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Enough of a reply to recognise it and quote its first line.
const SNIFF_READ: usize = 64;
/// The longest part of a reply quoted in an error.
const QUOTE_MAX: usize = 48;

/// What a port answered to a plain `PING` and, if it closed, to a TLS hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Speaks {
    Redis,
    Tls,
    /// The first bytes of a reply that is neither.
    Other(Vec<u8>),
    /// No answer, or no connection: nothing to add to the error.
    Unknown,
}

/// Asks the port a plain `PING`; if it closes the connection without a word,
/// sends a TLS hello, which a TLS server answers.
pub(super) async fn sniff(host: &str, port: u16) -> Speaks {
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
pub(super) fn quote(reply: &[u8]) -> String {
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
    use crate::peer::tests::answering;
    use tokio::net::TcpListener;

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
}
