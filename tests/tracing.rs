//! What the crate tells a tracing subscriber: a span per attempt, extend and
//! release with its counts, an event per instance outcome, and never a password or
//! a whole token.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use quorumlock::testing::{RedisCluster, RedisServer};
use quorumlock::QuorumLocker;
use tracing_subscriber::fmt::format::FmtSpan;

const PASSWORD: &str = "pw-that-must-not-leak";

/// Everything the subscriber writes, shared with the test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn spans_and_events_carry_counts_but_no_secrets() {
    let mut cluster = RedisCluster::start_with(
        3,
        &RedisServer::builder().arg("--requirepass").arg(PASSWORD),
    )
    .unwrap();
    let urls: Vec<String> = (0..3)
        .map(|i| format!("redis://:{PASSWORD}@127.0.0.1:{}", cluster.server(i).port()))
        .collect();
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_span_events(FmtSpan::CLOSE)
        .with_writer(move || writer.clone())
        .finish();
    // The test's runtime runs on this thread, background tasks included.
    let _default = tracing::subscriber::set_default(subscriber);

    let locker = QuorumLocker::builder()
        .urls(urls)
        .instance_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let lock = locker
        .acquire("traced-job", Duration::from_secs(10))
        .await
        .unwrap();
    let token = lock.token().to_string();
    lock.extend(Duration::from_secs(10)).await.unwrap();
    lock.release().await.unwrap();
    cluster.kill(2).unwrap();
    let held = locker
        .acquire("traced-job", Duration::from_secs(10))
        .await
        .unwrap();
    held.release().await.unwrap();
    locker.settle().await;

    let text = captured.text();
    if std::env::var_os("SHOW_TRACE").is_some() {
        println!("{text}");
    }
    let lines = |needle: &str| text.lines().filter(|line| line.contains(needle)).count();
    assert!(!text.contains(PASSWORD), "a password leaked:\n{text}");
    assert!(!text.contains(&token), "a whole token leaked:\n{text}");
    assert!(
        text.contains(&token[..6]),
        "tokens are shown abbreviated:\n{text}"
    );
    // One closed span per attempt, extend and release, with their counts.
    assert!(lines("attempt{key=traced-job attempt=1") >= 2, "{text}");
    assert!(
        text.contains("granted=") && text.contains("validity_ms="),
        "{text}"
    );
    assert!(lines("extend{key=traced-job") >= 1, "{text}");
    assert!(lines("release{key=traced-job") >= 2, "{text}");
    // An event per instance outcome, the dead instance's failure among them.
    assert!(lines("instance granted") >= 5, "{text}");
    assert!(lines("instance failed") >= 1, "{text}");
}
