//! Locks over `rediss://`: real `redis-server` TLS ports with a CA and
//! certificates made by the test, with and without client certificates, the
//! TLS settings' checks, and one-line errors for the usual mistakes.
#![cfg(feature = "tls")]

#[path = "common/certs.rs"]
mod certs;

use std::time::Duration;

use certs::Certs;
use quorumlock::testing::RedisCluster;
use quorumlock::{Builder, Error, QuorumLocker};

/// Generous: these tests check behaviour, not speed, on a loaded machine.
const TIMEOUT: Duration = Duration::from_secs(2);

fn tls_cluster(certs: &Certs, auth_clients: bool) -> RedisCluster {
    RedisCluster::start_with(3, &certs.server(auth_clients)).expect("start TLS redis-servers")
}

fn builder<I>(urls: I) -> Builder
where
    I: IntoIterator,
    I::Item: Into<String>,
{
    QuorumLocker::builder()
        .urls(urls)
        .instance_timeout(TIMEOUT)
        .default_wait(Duration::from_secs(5))
}

/// Takes, extends and releases a lock, checking the keys through the plain
/// ports.
async fn lock_cycle(locker: &QuorumLocker, cluster: &RedisCluster) {
    let lock = locker
        .acquire("tls-job", Duration::from_secs(10))
        .await
        .expect("acquire over TLS");
    // Decided at the quorum: let the last grant land before looking.
    locker.settle().await;
    for i in 0..cluster.len() {
        assert_eq!(
            cluster.keys(i, "tls-job").await.unwrap(),
            ["tls-job"],
            "instance {i}"
        );
    }
    let contender = locker.try_acquire("tls-job", Duration::from_secs(10)).await;
    assert!(
        matches!(contender, Err(Error::NotAcquired { .. })),
        "{contender:?}"
    );
    lock.extend(Duration::from_secs(20))
        .await
        .expect("extend over TLS");
    locker.settle().await;
    let mut connection = cluster.connection(0).await.unwrap();
    let pttl: i64 = redis::cmd("PTTL")
        .arg("tls-job")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(pttl > 10_000, "extended to 20 s, PTTL {pttl}");
    lock.release().await.expect("release over TLS");
    locker.settle().await;
    assert!(cluster.keys_everywhere("tls-job").await.unwrap().is_empty());
}

/// TLS clients keep the TCP settings every URL connection gets: TCP_NODELAY
/// (no Nagle delay between concurrent requests) and keep-alive.
fn assert_keeps_tcp_settings(locker: &QuorumLocker) {
    for index in 0..locker.instances() {
        let client = locker.redis_client(index).unwrap();
        let info = client.get_connection_info();
        assert!(
            matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }),
            "{:?}",
            info.addr()
        );
        assert!(info.tcp_settings().nodelay(), "instance {index}");
        assert!(
            info.tcp_settings().keepalive().is_some(),
            "instance {index}"
        );
    }
}

/// The error as one line, for the assertions.
fn one_line(err: &Error) -> String {
    let text = err.to_string();
    assert!(!text.contains('\n'), "not one line: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_extend_release_over_tls_with_a_private_ca() {
    let certs = Certs::new();
    let cluster = tls_cluster(&certs, false);
    let locker = builder(cluster.tls_urls())
        .tls_ca_file(certs.ca())
        .build()
        .await
        .unwrap();
    let health = locker.prepare().await.expect("prepare over TLS");
    assert_eq!(health.reachable(), 3, "{health}");
    assert!(locker
        .addresses()
        .all(|address| address.starts_with("rediss://127.0.0.1:")));
    lock_cycle(&locker, &cluster).await;
    assert_keeps_tcp_settings(&locker);
    // The process had no crypto provider: building a TLS instance installed one.
    assert!(rustls::crypto::CryptoProvider::get_default().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_may_be_given_as_pem_and_urls_as_valkeys() {
    let certs = Certs::new();
    let cluster = tls_cluster(&certs, false);
    let urls = cluster
        .servers()
        .iter()
        .map(|server| format!("valkeys://127.0.0.1:{}", server.tls_port().unwrap()));
    let pem = std::fs::read(certs.ca()).unwrap();
    let locker = builder(urls).tls_ca_pem(pem).build().await.unwrap();
    assert!(locker
        .addresses()
        .all(|address| address.starts_with("valkeys://")));
    lock_cycle(&locker, &cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_client_certificate() {
    let certs = Certs::new();
    let cluster = tls_cluster(&certs, true);
    let locker = builder(cluster.tls_urls())
        .tls_ca_file(certs.ca())
        .tls_client_cert_files(certs.path("client.crt"), certs.path("client.key"))
        .wake_waiters(true)
        .build()
        .await
        .unwrap();
    assert_keeps_tcp_settings(&locker);
    locker
        .prepare()
        .await
        .expect("prepare with a client certificate");
    lock_cycle(&locker, &cluster).await;

    // A waiter is woken by the release over its own TLS subscription.
    let held = locker
        .acquire("handed-over", Duration::from_secs(30))
        .await
        .unwrap();
    let waiter = tokio::spawn({
        let locker = locker.clone();
        async move { locker.acquire("handed-over", Duration::from_secs(30)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    held.release().await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter got the lock")
        .unwrap()
        .unwrap();
    next.release().await.unwrap();

    // The locker's client for an instance carries the same certificates.
    let client = locker.redis_client(1).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let pong: String = redis::cmd("PING")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(pong, "PONG");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_foreign_client_certificate_is_one_line() {
    let certs = Certs::new();
    let cluster = tls_cluster(&certs, true);
    let without = builder(cluster.tls_urls())
        .tls_ca_file(certs.ca())
        .build()
        .await
        .unwrap();
    let err = without.prepare().await.unwrap_err();
    let text = one_line(&err);
    assert!(matches!(err, Error::Unavailable { .. }), "{text}");
    assert!(
        text.contains("TLS: the server requires a client certificate (tls-auth-clients)"),
        "{text}"
    );

    let foreign = builder(cluster.tls_urls())
        .tls_ca_file(certs.ca())
        .tls_client_cert_files(certs.path("stranger.crt"), certs.path("stranger.key"))
        .build()
        .await
        .unwrap();
    let err = foreign
        .try_acquire("job", Duration::from_secs(10))
        .await
        .unwrap_err();
    let text = one_line(&err);
    assert!(matches!(err, Error::NotAcquired { .. }), "{text}");
    assert!(
        text.contains("TLS: the server refused our client certificate"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_ca_is_one_line() {
    let certs = Certs::new();
    let cluster = tls_cluster(&certs, false);
    // The platform's roots, then a CA that did not sign the servers' certificates.
    for locker in [
        builder(cluster.tls_urls()).build().await.unwrap(),
        builder(cluster.tls_urls())
            .tls_ca_file(certs.path("other-ca.crt"))
            .build()
            .await
            .unwrap(),
    ] {
        let err = locker
            .try_acquire("job", Duration::from_secs(10))
            .await
            .unwrap_err();
        let text = one_line(&err);
        assert_eq!(err.unreachable_instances(), 3, "{text}");
        assert!(
            text.contains(
                "failed: TLS: the server's certificate is not signed by a trusted CA \
                 (UnknownIssuer): give its CA with tls_ca_file"
            ),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrong_port_for_the_scheme_is_one_line() {
    let certs = Certs::new();
    let cluster = tls_cluster(&certs, false);
    let server = cluster.server(0);

    // TLS to the plain port: the handshake hangs until the connect timeout.
    let plain = format!("rediss://127.0.0.1:{}", server.port());
    let locker = builder([plain])
        .tls_ca_file(certs.ca())
        .build()
        .await
        .unwrap();
    let err = locker.prepare().await.unwrap_err();
    let text = one_line(&err);
    assert!(
        text.contains("failed: the server speaks plain Redis on this port, not TLS: use redis://"),
        "{text}"
    );

    // Plain Redis to the TLS port: the server resets the connection.
    let tls_port = format!("redis://127.0.0.1:{}", server.tls_port().unwrap());
    let locker = builder([tls_port]).build().await.unwrap();
    let err = locker
        .try_acquire("job", Duration::from_secs(10))
        .await
        .unwrap_err();
    let text = one_line(&err);
    assert!(
        text.contains("failed: the server speaks TLS on this port: use rediss://"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_is_turned_off_only_by_the_builder() {
    let certs = Certs::new();
    let cluster = tls_cluster(&certs, false);
    let fragment: Vec<String> = cluster
        .tls_urls()
        .iter()
        .map(|url| format!("{url}/#insecure"))
        .collect();
    let err = builder(fragment.clone()).build().await.err().unwrap();
    let text = one_line(&err);
    assert!(matches!(err, Error::InvalidUrl { index: 0, .. }), "{text}");
    assert!(text.contains("danger_accept_invalid_certs"), "{text}");

    // With the opt-in, no CA is needed: the certificates are not checked.
    let locker = builder(cluster.tls_urls())
        .danger_accept_invalid_certs(true)
        .build()
        .await
        .unwrap();
    assert_keeps_tcp_settings(&locker);
    lock_cycle(&locker, &cluster).await;
    let locker = builder(fragment)
        .danger_accept_invalid_certs(true)
        .build()
        .await
        .unwrap();
    locker.prepare().await.unwrap();
}

#[tokio::test]
async fn tls_settings_are_checked_before_connecting() {
    let certs = Certs::new();
    // Nothing listens here: every error below comes from the build.
    let url = "rediss://127.0.0.1:9";
    let invalid = |err: Error| match err {
        Error::InvalidConfig { setting, reason } => format!("{setting}: {reason}"),
        other => panic!("not InvalidConfig: {other}"),
    };
    let missing = certs.dir().join("missing.crt");
    let err = builder([url])
        .tls_ca_file(&missing)
        .build()
        .await
        .err()
        .unwrap();
    let text = invalid(err);
    assert!(
        text.starts_with("tls_ca_file: ") && text.contains("missing.crt"),
        "{text}"
    );

    let err = builder([url])
        .tls_ca_pem("garbage")
        .build()
        .await
        .err()
        .unwrap();
    assert!(invalid(err).starts_with("tls_ca_pem: no PEM certificate"));

    // A key given as the CA: PEM, but no certificate in it.
    let err = builder([url])
        .tls_ca_file(certs.path("client.key"))
        .build()
        .await
        .err()
        .unwrap();
    assert!(invalid(err).contains("no PEM certificate"));

    // The client certificate with the server's key.
    let err = builder([url])
        .tls_client_cert_files(certs.path("client.crt"), certs.path("server.key"))
        .build()
        .await
        .err()
        .unwrap();
    let text = invalid(err);
    assert!(
        text.starts_with("tls_client_cert_files: ")
            && text.contains("the private key does not belong to the certificate"),
        "{text}"
    );

    let err = builder([url])
        .tls_client_cert(std::fs::read(certs.path("client.crt")).unwrap(), "no key")
        .build()
        .await
        .err()
        .unwrap();
    assert!(invalid(err).starts_with("tls_client_cert: no PEM private key"));

    // TLS settings, but every URL is plain: most likely a forgotten rediss://.
    let err = builder(["redis://127.0.0.1:9"])
        .tls_ca_file(certs.ca())
        .build()
        .await
        .err()
        .unwrap();
    assert_eq!(
        invalid(err),
        "tls_ca_file: no instance URL uses TLS (rediss:// or valkeys://)"
    );
    // Turned off again, danger_accept_invalid_certs is no TLS setting.
    builder(["redis://127.0.0.1:9"])
        .danger_accept_invalid_certs(true)
        .danger_accept_invalid_certs(false)
        .build()
        .await
        .unwrap();
}

mod qlock {
    use std::process::{Command, Output};

    use super::*;

    const QLOCK: &str = env!("CARGO_BIN_EXE_qlock");

    /// `qlock` over `urls`, with nothing from the caller's environment.
    fn qlock(urls: &[String]) -> Command {
        let mut command = Command::new(QLOCK);
        command.env("QLOCK_REDIS_URLS", urls.join(","));
        for var in [
            "QLOCK_KEY_PREFIX",
            "QLOCK_TLS_CA",
            "QLOCK_TLS_CERT",
            "QLOCK_TLS_KEY",
            "QLOCK_TLS_INSECURE",
        ] {
            command.env_remove(var);
        }
        command
    }

    fn run(command: &mut Command) -> (Option<i32>, String, String) {
        let Output {
            status,
            stdout,
            stderr,
        } = command.output().expect("run qlock");
        let stderr = String::from_utf8_lossy(&stderr).into_owned();
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(stderr.lines().count() <= 1, "not one line: {stderr}");
        (
            status.code(),
            String::from_utf8_lossy(&stdout).into_owned(),
            stderr,
        )
    }

    #[test]
    fn qlock_takes_the_tls_options_as_flags_and_from_the_environment() {
        let certs = Certs::new();
        let cluster = tls_cluster(&certs, true);
        let urls = cluster.tls_urls();
        let flags = [
            "--tls-ca".into(),
            certs.ca().into_os_string(),
            "--tls-cert".into(),
            certs.path("client.crt").into_os_string(),
            "--tls-key".into(),
            certs.path("client.key").into_os_string(),
        ];
        let (code, stdout, stderr) = run(qlock(&urls).args(&flags).arg("health"));
        assert_eq!(code, Some(0), "{stdout}{stderr}");
        assert!(stdout.contains("3 of 3 instance(s) reachable"), "{stdout}");

        let (code, stdout, stderr) = run(qlock(&urls)
            .env("QLOCK_TLS_CA", certs.ca())
            .env("QLOCK_TLS_CERT", certs.path("client.crt"))
            .env("QLOCK_TLS_KEY", certs.path("client.key"))
            .args(["run", "--key", "tls-cli", "--", "true"]));
        assert_eq!(code, Some(0), "{stdout}{stderr}");

        let (code, stdout, stderr) = run(qlock(&urls).args(&flags).args(["status", "tls-cli"]));
        // Released: no quorum holds it, and every instance was read over TLS.
        assert_eq!(code, Some(3), "{stdout}{stderr}");
        assert_eq!(stdout.matches(": free").count(), 3, "{stdout}");
    }

    #[test]
    fn qlock_reports_tls_mistakes_in_one_line() {
        let certs = Certs::new();
        let cluster = tls_cluster(&certs, false);
        let urls = cluster.tls_urls();

        // No CA: the instances are unreachable, each line says why.
        let (code, stdout, stderr) = run(qlock(&urls).arg("health"));
        assert_eq!(code, Some(1), "{stdout}{stderr}");
        assert_eq!(
            stdout.matches("not signed by a trusted CA (UnknownIssuer): give its CA with tls_ca_file (qlock: --tls-ca)").count(),
            3,
            "{stdout}"
        );
        assert!(stderr.starts_with("qlock: error: only 0 of 3"), "{stderr}");
        let (code, _, stderr) = run(qlock(&urls).args(["run", "--key", "k", "--", "true"]));
        assert_eq!(code, Some(1));
        assert!(stderr.contains("not signed by a trusted CA"), "{stderr}");

        // --tls-insecure: no verification, so no CA needed.
        let (code, stdout, stderr) = run(qlock(&urls).args(["--tls-insecure", "health"]));
        assert_eq!(code, Some(0), "{stdout}{stderr}");

        // Usage errors, before anything connects.
        let (code, _, stderr) = run(qlock(&urls)
            .arg("--tls-cert")
            .arg(certs.path("client.crt"))
            .arg("health"));
        assert_eq!(code, Some(2), "{stderr}");
        assert!(stderr.contains("--tls-key"), "{stderr}");
        let (code, _, stderr) = run(qlock(&urls)
            .arg("--tls-ca")
            .arg(certs.dir().join("nowhere.crt"))
            .arg("health"));
        assert_eq!(code, Some(2), "{stderr}");
        assert!(
            stderr.starts_with("qlock: error: invalid tls_ca_file: ")
                && stderr.contains("nowhere.crt"),
            "{stderr}"
        );

        // The plain port behind rediss://.
        let plain = [format!("rediss://127.0.0.1:{}", cluster.server(0).port())];
        let (code, stdout, _) = run(qlock(&plain).arg("--tls-ca").arg(certs.ca()).arg("health"));
        assert_eq!(code, Some(1));
        assert!(
            stdout.contains("failed: the server speaks plain Redis on this port, not TLS"),
            "{stdout}"
        );
    }
}
