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
    if !cfg!(feature = "tls") && url.starts_with("rediss://") {
        return Err(invalid(
            "rediss:// needs quorumlock's `tls` feature".to_string(),
        ));
    }
    let info = url
        .into_connection_info()
        .map_err(|err| invalid(strip_url(&err.to_string(), url)))?;
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

/// The URL with any password in its user-info part replaced by `***`.
pub(crate) fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let user_info = &authority[..at];
    let user = match user_info.find(':') {
        Some(colon) => format!("{}:***", &user_info[..colon]),
        None => user_info.to_string(),
    };
    format!("{}{user}{}", &url[..scheme_end], &url[scheme_end + at..])
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
        fn password_never_shown(password in "[A-Za-z0-9]{6,20}", port in 1u16..) {
            let url = format!("redis://user:{password}@host:{port}/1");
            let text = match parse_url(0, &url) {
                Ok(parsed) => parsed.display,
                Err(err) => err.to_string(),
            };
            prop_assert!(!text.contains(&password));
            prop_assert!(!redact_url(&url).contains(&password));
        }
    }
}
