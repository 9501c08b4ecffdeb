//! Instances that are not what their URL says: a port that is not Redis at
//! all (an HTTP server, garbage), a TLS port behind `redis://`; and Valkey's
//! URL schemes against a Redis-protocol server. Each failure reads as one line
//! in the library's errors and in `qlock`.

#[path = "common/certs.rs"]
mod certs;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::thread;
use std::time::Duration;

use quorumlock::testing::RedisCluster;
use quorumlock::{Error, QuorumLocker, Vote};

const QLOCK: &str = env!("CARGO_BIN_EXE_qlock");
const HTTP_400: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
/// Bytes no protocol would send, ending in a newline so that a line reader
/// returns them.
const GARBAGE: &[u8] = &[0x9c, 0x01, 0xff, 0x42, 0x00, 0x13, 0x37, 0xee, 0x7f, b'\n'];

/// A loopback port that answers every connection's first bytes with `reply`,
/// then closes it; it serves until the test process ends.
fn answering(reply: &'static [u8]) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                let mut request = [0; 1024];
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                if stream.read(&mut request).is_ok() {
                    let _ = stream.write_all(reply);
                }
            });
        }
    });
    port
}

fn one_line(err: &Error) -> String {
    let text = err.to_string();
    assert!(!text.contains('\n'), "not one line: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_that_is_not_redis_is_named_so() {
    let http = format!("redis://127.0.0.1:{}", answering(HTTP_400));
    let garbage = format!("redis://127.0.0.1:{}", answering(GARBAGE));
    let locker = QuorumLocker::builder()
        .urls([http, garbage])
        .quorum(2)
        .instance_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();

    let err = locker
        .try_acquire("job", Duration::from_secs(10))
        .await
        .unwrap_err();
    let text = one_line(&err);
    assert!(matches!(err, Error::NotAcquired { .. }), "{text}");
    assert!(
        text.contains("instance 0 (redis://127.0.0.1:")
            && text.contains(
                "failed: not a Redis server: it answered PING with \"HTTP/1.1 400 Bad Request\"…"
            ),
        "{text}"
    );
    assert!(
        text.contains(
            "failed: not a Redis server: it answered PING with \"\\x9c\\x01\\xffB\\x00\\x137\\xee\\x7f\"…"
        ),
        "{text}"
    );

    let err = locker.prepare().await.unwrap_err();
    let text = one_line(&err);
    assert!(matches!(err, Error::Unavailable { .. }), "{text}");
    assert_eq!(
        text.matches("not a Redis server: it answered PING").count(),
        2,
        "{text}"
    );

    let health = locker.health().await;
    for instance in health.instances() {
        let Some(Vote::Failed(err)) = &instance.error else {
            panic!("instance {} reachable: {health}", instance.index);
        };
        assert!(err.to_string().starts_with("not a Redis server: "), "{err}");
    }
}

#[test]
fn qlock_names_a_port_that_is_not_redis() {
    let cluster = RedisCluster::start(1).unwrap();
    let urls = [
        cluster.urls().remove(0),
        format!("redis://127.0.0.1:{}", answering(HTTP_400)),
        format!("redis://127.0.0.1:{}", answering(GARBAGE)),
    ];
    let qlock = |args: &[&str]| {
        Command::new(QLOCK)
            .args(args)
            .env("QLOCK_REDIS_URLS", urls.join(","))
            .env_remove("QLOCK_KEY_PREFIX")
            .output()
            .expect("run qlock")
    };

    let output = qlock(&["health"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let line = |index: usize| {
        stdout
            .lines()
            .find(|line| line.starts_with(&format!("instance {index} (")))
            .unwrap_or_else(|| panic!("no line for instance {index}: {stdout}"))
    };
    assert!(
        line(1).ends_with(
            "failed: not a Redis server: it answered PING with \"HTTP/1.1 400 Bad Request\"…"
        ),
        "{stdout}"
    );
    assert!(
        line(2).contains("failed: not a Redis server: it answered PING with \"\\x9c"),
        "{stdout}"
    );

    let output = qlock(&["run", "--key", "job", "--", "true"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("qlock: error: only 1 of 3 instance(s) can vote (the others are down or quarantined), 2 needed: instance 1")
            && stderr.matches("not a Redis server").count() == 2,
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_urls_to_a_tls_port_say_so() {
    let certs = certs::Certs::new();
    let cluster = RedisCluster::start_with(1, &certs.server(false)).unwrap();
    let url = format!(
        "redis://127.0.0.1:{}",
        cluster.server(0).tls_port().unwrap()
    );
    let locker = QuorumLocker::builder()
        .url(url)
        .instance_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let err = locker.prepare().await.unwrap_err();
    let text = one_line(&err);
    let expected = if cfg!(feature = "tls") {
        "failed: the server speaks TLS on this port: use rediss://"
    } else {
        "failed: the server speaks TLS on this port: use rediss:// (quorumlock's `tls` feature)"
    };
    assert!(text.ends_with(expected), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_urls_reach_a_redis_protocol_server() {
    let cluster = RedisCluster::start(3).unwrap();
    let urls: Vec<String> = cluster
        .servers()
        .iter()
        .map(|server| format!("valkey://127.0.0.1:{}", server.port()))
        .collect();
    let locker = QuorumLocker::builder()
        .urls(urls.clone())
        .instance_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let addresses: Vec<&str> = locker.addresses().collect();
    assert_eq!(addresses, urls);
    let lock = locker
        .acquire("valkey-job", Duration::from_secs(10))
        .await
        .unwrap();
    lock.extend(Duration::from_secs(10)).await.unwrap();
    // Decided at the quorum: let the last replies land before looking.
    locker.settle().await;
    assert_eq!(
        cluster.keys_everywhere("valkey-job").await.unwrap().len(),
        3
    );
    lock.release().await.unwrap();
    locker.settle().await;
    assert!(cluster
        .keys_everywhere("valkey-job")
        .await
        .unwrap()
        .is_empty());

    // One server under redis:// and valkey:// would vote twice.
    let err = QuorumLocker::builder()
        .url(cluster.urls().remove(0))
        .url(urls[0].clone())
        .build()
        .await
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            Error::DuplicateInstance {
                first: 0,
                second: 1,
                ..
            }
        ),
        "{err}"
    );
}
