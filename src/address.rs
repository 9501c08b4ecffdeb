//! Instance addresses as shown to people (password never included) and as compared
//! to refuse duplicates.

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo};

use crate::error::Error;

/// The URL schemes accepted: redis-rs reads `valkey` as `redis` (Valkey speaks
/// the same protocol), and `unix` as `redis+unix`.
const SCHEMES: [&str; 7] = [
    "redis",
    "rediss",
    "redis+unix",
    "unix",
    "valkey",
    "valkeys",
    "valkey+unix",
];

/// A parsed Redis URL: what to connect to, how to show it, and what identifies it.
pub(crate) struct ParsedUrl {
    pub(crate) info: ConnectionInfo,
    /// `redis://user@host:port/db`, without the password.
    pub(crate) display: String,
    /// The server, for duplicate detection: two URLs naming one server (even with
    /// different databases) would give that server two votes.
    pub(crate) identity: String,
}

/// Parses instance `index`'s URL; errors show the URL with its password redacted.
pub(crate) fn parse_url(index: usize, url: &str) -> Result<ParsedUrl, Error> {
    let invalid = |reason: String| Error::InvalidUrl {
        index,
        url: redact_url(url),
        reason,
    };
    let scheme = match url.split_once("://") {
        None if url.trim().is_empty() => return Err(invalid("empty".to_string())),
        None => {
            return Err(invalid(
                "no scheme; expected redis://[user[:password]@]host[:port][/db]".to_string(),
            ))
        }
        Some((scheme, _)) if !SCHEMES.contains(&scheme) => {
            return Err(invalid(format!(
                "unsupported scheme {scheme:?}; expected redis://, rediss://, redis+unix:// \
                 (or valkey://, valkeys://, valkey+unix://)"
            )))
        }
        Some((scheme, _)) => scheme,
    };
    let needs_tls = || invalid(format!("{scheme}:// needs quorumlock's `tls` feature"));
    if !cfg!(feature = "tls") && matches!(scheme, "rediss" | "valkeys") {
        return Err(needs_tls());
    }
    let info = url.into_connection_info().map_err(|err| {
        invalid(format!(
            "{}; expected redis://[user[:password]@]host[:port][/db]",
            strip_url(&err.to_string(), url)
        ))
    })?;
    if !info.addr().is_supported() {
        return Err(needs_tls());
    }
    // Shown as given: `valkey://` stays `valkey://`.
    let valkey = scheme.starts_with("valkey");
    let (scheme, server) = match info.addr() {
        ConnectionAddr::Tcp(host, port) => ("redis", format!("{}:{port}", host.to_lowercase())),
        ConnectionAddr::TcpTls { host, port, .. } => {
            ("rediss", format!("{}:{port}", host.to_lowercase()))
        }
        ConnectionAddr::Unix(path) => ("redis+unix", path.display().to_string()),
        _ => return Err(invalid("unsupported address kind".to_string())),
    };
    let scheme = match (valkey, scheme) {
        (true, "redis") => "valkey",
        (true, "rediss") => "valkeys",
        (true, _) => "valkey+unix",
        (false, scheme) => scheme,
    };
    let redis = info.redis_settings();
    let user = match (redis.username(), redis.password()) {
        (Some(user), Some(_)) => format!("{user}:***@"),
        (Some(user), None) => format!("{user}@"),
        (None, Some(_)) => ":***@".to_string(),
        (None, None) => String::new(),
    };
    let db = match redis.db() {
        0 => String::new(),
        db => format!("/{db}"),
    };
    Ok(ParsedUrl {
        display: format!("{scheme}://{user}{server}{db}"),
        identity: server,
        info,
    })
}

/// The URL with anything that may be a password replaced by `***`: the user-info
/// part (up to the last `@`, since a password may hold `/`, `?` or `#`) and the
/// values of query parameters whose name mentions a password. Used on input that
/// may not parse, so it over-redacts rather than guess.
pub(crate) fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    // Query first, so that an `@` inside a query password is gone before the
    // user-info search. Everything after a password parameter goes: its value
    // may hold `&`.
    let rest = match rest.split_once('?') {
        Some((path, query)) => {
            let mut kept = Vec::new();
            for pair in query.split('&') {
                match pair.split_once('=') {
                    Some((name, _)) if name.to_ascii_lowercase().contains("pass") => {
                        kept.push(format!("{name}=***"));
                        break;
                    }
                    _ => kept.push(pair.to_string()),
                }
            }
            format!("{path}?{}", kept.join("&"))
        }
        None => rest.to_string(),
    };
    let rest = match rest.rfind('@') {
        Some(at) => match rest[..at].split_once(':') {
            Some((user, _)) if !user.contains(['/', '?', '#']) => {
                format!("{user}:***{}", &rest[at..])
            }
            _ => format!("***{}", &rest[at..]),
        },
        None => rest,
    };
    format!("{scheme}{rest}")
}

/// Parse errors may quote the input; keep the password out of them.
fn strip_url(message: &str, url: &str) -> String {
    if url.is_empty() {
        message.to_string()
    } else {
        message.replace(url, &redact_url(url))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn display_keeps_user_and_hides_password() {
        let parsed = parse_url(0, "redis://alice:s3cret@Redis.Example:6380/2").unwrap();
        assert_eq!(parsed.display, "redis://alice:***@redis.example:6380/2");
        assert_eq!(parsed.identity, "redis.example:6380");
        let parsed = parse_url(0, "redis://:s3cret@127.0.0.1").unwrap();
        assert_eq!(parsed.display, "redis://:***@127.0.0.1:6379");
    }

    #[test]
    fn valkey_urls_are_redis_urls_shown_as_given() {
        let parsed = parse_url(0, "valkey://bob:pw@Valkey.Example:6390/3").unwrap();
        assert_eq!(parsed.display, "valkey://bob:***@valkey.example:6390/3");
        assert_eq!(parsed.identity, "valkey.example:6390");
        assert!(
            matches!(parsed.info.addr(), ConnectionAddr::Tcp(host, 6390) if host == "Valkey.Example")
        );
        // One server under both schemes is one server.
        let redis = parse_url(1, "redis://valkey.example:6390").unwrap();
        assert_eq!(redis.identity, parsed.identity);
        let unix = parse_url(0, "valkey+unix:///run/valkey.sock").unwrap();
        assert_eq!(unix.display, "valkey+unix:///run/valkey.sock");
        let tls = parse_url(0, "valkeys://:pw@h:6391");
        if cfg!(feature = "tls") {
            let tls = tls.unwrap();
            assert_eq!(tls.display, "valkeys://:***@h:6391");
            assert!(matches!(tls.info.addr(), ConnectionAddr::TcpTls { .. }));
        } else {
            let err = tls.err().unwrap().to_string();
            assert!(
                err.contains("valkeys:// needs quorumlock's `tls` feature"),
                "{err}"
            );
        }
    }

    #[test]
    fn redaction_of_unparsable_urls() {
        assert_eq!(redact_url("redis://u:pw@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact_url("redis://:pw@h"), "redis://:***@h");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
        assert_eq!(redact_url("nonsense"), "nonsense");
        assert_eq!(redact_url("alice:pw@host:6379"), "alice:***@host:6379");
        assert_eq!(redact_url("redis://a:p/w#x@h:1"), "redis://a:***@h:1");
        assert_eq!(
            redact_url("redis://h:1/?password=pw&db=2"),
            "redis://h:1/?password=***"
        );
        assert_eq!(
            redact_url("redis+unix:///s.sock?pass=pw"),
            "redis+unix:///s.sock?pass=***"
        );
    }

    #[test]
    fn bad_urls_are_typed_errors() {
        for url in [
            "",
            "http://h:1",
            "valkey:/h:1",
            "redis://",
            "redis://h:notaport",
            "redis://:pw@h:99999",
        ] {
            match parse_url(3, url) {
                Err(Error::InvalidUrl {
                    index: 3,
                    url: shown,
                    ..
                }) => {
                    assert!(!shown.contains("pw@"), "{shown}")
                }
                Err(other) => panic!("{url}: unexpected {other}"),
                Ok(_) => panic!("{url}: accepted"),
            }
        }
    }

    proptest! {
        #[test]
        fn password_never_shown(
            password in "[A-Za-z0-9/?#:@%]{6,20}",
            port in 1u32..100_000,
            form in 0usize..5,
        ) {
            prop_assume!(password.chars().filter(char::is_ascii_alphanumeric).count() >= 4);
            let url = match form {
                0 => format!("redis://user:{password}@host:{port}/1"),
                1 => format!("user:{password}@host:{port}"),
                2 => format!("redis://host:{port}/?password={password}"),
                3 => format!("valkey://user:{password}@host:{port}"),
                _ => format!("rediss://:{password}@host:{port}"),
            };
            let text = match parse_url(0, &url) {
                Ok(parsed) => parsed.display,
                Err(err) => err.to_string(),
            };
            prop_assert!(!text.contains(&password));
            prop_assert!(!redact_url(&url).contains(&password));
        }
    }
}
