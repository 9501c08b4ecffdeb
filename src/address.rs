//! Instance addresses as shown to people (password never included) and as compared
//! to refuse duplicates.

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo};

use crate::error::Error;

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
    match url.split_once("://") {
        None if url.trim().is_empty() => return Err(invalid("empty".to_string())),
        None => {
            return Err(invalid(
                "no scheme; expected redis://[user[:password]@]host[:port][/db]".to_string(),
            ))
        }
        Some((scheme, _)) if !["redis", "rediss", "redis+unix", "unix"].contains(&scheme) => {
            return Err(invalid(format!(
                "unsupported scheme {scheme:?}; expected redis://, rediss:// or redis+unix://"
            )))
        }
        Some(_) => {}
    }
    if !cfg!(feature = "tls") && url.starts_with("rediss://") {
        return Err(invalid(
            "rediss:// needs quorumlock's `tls` feature".to_string(),
        ));
    }
    let info = url.into_connection_info().map_err(|err| {
        invalid(format!(
            "{}; expected redis://[user[:password]@]host[:port][/db]",
            strip_url(&err.to_string(), url)
        ))
    })?;
    if !info.addr().is_supported() {
        return Err(invalid(
            "rediss:// needs quorumlock's `tls` feature".to_string(),
        ));
    }
    let (scheme, server) = match info.addr() {
        ConnectionAddr::Tcp(host, port) => ("redis", format!("{}:{port}", host.to_lowercase())),
        ConnectionAddr::TcpTls { host, port, .. } => {
            ("rediss", format!("{}:{port}", host.to_lowercase()))
        }
        ConnectionAddr::Unix(path) => ("redis+unix", path.display().to_string()),
        _ => return Err(invalid("unsupported address kind".to_string())),
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
            form in 0usize..4,
        ) {
            prop_assume!(password.chars().filter(char::is_ascii_alphanumeric).count() >= 4);
            let url = match form {
                0 => format!("redis://user:{password}@host:{port}/1"),
                1 => format!("user:{password}@host:{port}"),
                2 => format!("redis://host:{port}/?password={password}"),
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
