//! The metrics (cargo feature `metrics`), read back through a debugging
//! recorder around real servers: each name the README lists is recorded, with
//! its labels, where the operation it counts happened.
#![cfg(feature = "metrics")]

mod common;

use std::time::Duration;

use common::{builder, cluster};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::MetricKind;

const TTL: Duration = Duration::from_secs(10);

#[test]
fn every_operation_is_counted() {
    let cluster = cluster(3);
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // A local recorder and a current-thread runtime: the background work and
    // the connections' tasks run on this thread, so nothing escapes it, and
    // tests of this binary running beside it record nothing here.
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            // A generous instance timeout: on a loaded machine a reply later
            // than the default 50 ms is no reply, and every instance's are
            // counted below.
            let locker = builder(&cluster)
                .instance_timeout(Duration::from_secs(2))
                .build()
                .await
                .unwrap();
            locker.prepare().await.unwrap();
            let lock = locker.acquire("metrics", TTL).await.unwrap();
            let refused = locker.try_acquire("metrics", TTL).await;
            assert!(refused.is_err());
            lock.extend(TTL).await.unwrap();
            lock.release().await.unwrap();
            // A dropped lock is released in the background.
            drop(locker.acquire("metrics-dropped", TTL).await.unwrap());
            locker.settle().await;
        });
    });

    let snapshot = snapshotter.snapshot().into_vec();
    let find = |name: &str, labels: &[(&str, &str)]| {
        snapshot
            .iter()
            .filter(|(key, ..)| key.key().name() == name)
            .filter(|(key, ..)| {
                labels.iter().all(|(label, value)| {
                    key.key()
                        .labels()
                        .any(|l| l.key() == *label && l.value() == *value)
                })
            })
            .map(|(key, _, _, value)| (key.kind(), value))
            .collect::<Vec<_>>()
    };
    let counter = |name: &str, labels: &[(&str, &str)]| -> u64 {
        find(name, labels)
            .into_iter()
            .map(|(kind, value)| match (kind, value) {
                (MetricKind::Counter, DebugValue::Counter(n)) => *n,
                other => panic!("{name} is not a counter: {other:?}"),
            })
            .sum()
    };
    let samples = |name: &str, labels: &[(&str, &str)]| -> usize {
        find(name, labels)
            .into_iter()
            .map(|(_, value)| match value {
                DebugValue::Histogram(values) => values.len(),
                other => panic!("{name} is not a histogram: {other:?}"),
            })
            .sum()
    };

    assert_eq!(
        counter("quorumlock_acquires_total", &[("outcome", "won")]),
        2
    );
    assert_eq!(
        counter("quorumlock_acquires_total", &[("outcome", "contended")]),
        1
    );
    assert_eq!(
        samples("quorumlock_acquire_seconds", &[("outcome", "won")]),
        2
    );
    assert_eq!(samples("quorumlock_acquire_attempts", &[]), 3);
    assert_eq!(samples("quorumlock_validity_at_grant_seconds", &[]), 2);
    assert_eq!(
        counter("quorumlock_extends_total", &[("outcome", "extended")]),
        1
    );
    assert_eq!(samples("quorumlock_hold_seconds", &[]), 2);
    assert_eq!(counter("quorumlock_locks_lost_total", &[]), 0);
    // Every instance answered the acquire, the refused attempt, the extend and
    // the release: granted votes from each, and refusals in the second attempt.
    for url in cluster.urls() {
        // The instance label is the address as the locker shows it.
        let address = url.trim_end_matches('/');
        let replies = counter(
            "quorumlock_instance_replies_total",
            &[("instance", address)],
        );
        assert!(replies >= 4, "{address}: {replies} replies");
        assert!(
            samples(
                "quorumlock_instance_reply_seconds",
                &[("instance", address)]
            ) >= 4
        );
    }
    assert!(counter("quorumlock_instance_replies_total", &[("vote", "refused")]) >= 2);
    assert!(!find("quorumlock_quarantined_instances", &[]).is_empty());
    assert!(!find("quorumlock_background_tasks", &[]).is_empty());
}
