//! Every bad input is a typed error, raised before any I/O: no panic, no hang, and
//! Redis left exactly as it was.

mod common;

use std::time::Duration;

use common::{builder, cluster, locker, total_keys};
use quorumlock::{Error, QuorumLocker, MAX_TTL};

#[tokio::test]
async fn bad_keys_and_ttls_leave_redis_unchanged() {
    let cluster = cluster(3);
    let locker = locker(&cluster).await;
    let ok = Duration::from_secs(1);

    for call in ["acquire", "try_acquire"] {
        let attempt = |key: &'static str, ttl: Duration| {
            let locker = locker.clone();
            async move {
                match call {
                    "acquire" => locker.acquire(key, ttl).await,
                    _ => locker.try_acquire(key, ttl).await,
                }
            }
        };
        assert!(matches!(attempt("", ok).await, Err(Error::EmptyKey)));
        // The names of quorumlock's own keys: a lock there would clash with
        // another locker's epoch hash, or with the fencing counter of `job`.
        for key in ["quorumlock:epoch", "job:fence"] {
            match attempt(key, ok).await {
                Err(Error::ReservedKey { key: shown }) => assert_eq!(shown, key),
                other => panic!("{call} of {key:?}: {other:?}"),
            }
        }
        for ttl in [
            Duration::ZERO,
            Duration::from_micros(999),
            Duration::from_millis(2), // not longer than its drift allowance
            MAX_TTL + Duration::from_millis(1),
            Duration::MAX,
        ] {
            match attempt("job", ttl).await {
                Err(Error::InvalidTtl { ttl: shown, .. }) => assert_eq!(shown, ttl),
                other => panic!("{call} with {ttl:?}: {other:?}"),
            }
        }
    }
    assert_eq!(total_keys(&cluster).await, 0);

    // The extremes that are valid do work.
    let lock = locker.try_acquire("job", MAX_TTL).await.unwrap();
    lock.release().await.unwrap();
    let lock = locker.try_acquire("job", Duration::from_millis(3)).await;
    if let Ok(lock) = lock {
        let _ = lock.release().await;
    }
    locker.settle().await;
    assert_eq!(total_keys(&cluster).await, 0);
}

#[tokio::test]
async fn bad_instance_sets_are_refused_at_build() {
    let cluster = cluster(3);
    let urls = cluster.urls();

    assert!(matches!(
        QuorumLocker::builder().build().await,
        Err(Error::NoInstances)
    ));

    let duplicate = QuorumLocker::builder()
        .url(&urls[0])
        .url(&urls[1])
        // The same server spelled differently: explicit database 0.
        .url(format!("{}/0", urls[0]))
        .build()
        .await;
    match duplicate {
        Err(Error::DuplicateInstance {
            first: 0,
            second: 2,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    // Another database on the same server is still the same server.
    let same_server = QuorumLocker::builder()
        .url(&urls[0])
        .url(format!("{}/3", urls[0]))
        .build()
        .await;
    assert!(matches!(
        same_server,
        Err(Error::DuplicateInstance {
            first: 0,
            second: 1,
            ..
        })
    ));

    for (n, quorum) in [(3, 4), (3, 1), (3, 0), (2, 1), (1, 0), (1, 2)] {
        let urls = &urls[..n];
        let result = QuorumLocker::builder()
            .urls(urls)
            .quorum(quorum)
            .build()
            .await;
        assert!(
            matches!(result, Err(Error::QuorumOutOfRange { .. })),
            "quorum {quorum} of {n}: {result:?}"
        );
    }
}

#[tokio::test]
async fn bad_urls_are_typed_and_redacted() {
    for url in [
        "",
        "not a url",
        "http://127.0.0.1:7000",
        "redis://:hunter2@127.0.0.1:notaport",
        "redis://user:hunter2@[::1",
    ] {
        match QuorumLocker::builder()
            .url("redis://127.0.0.1:1")
            .url(url)
            .build()
            .await
        {
            Err(err @ Error::InvalidUrl { index: 1, .. }) => {
                assert!(!err.to_string().contains("hunter2"), "{err}");
            }
            other => panic!("{url:?}: {other:?}"),
        }
    }
    #[cfg(not(feature = "tls"))]
    {
        let err = QuorumLocker::builder()
            .url("rediss://127.0.0.1:1")
            .build()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("`tls` feature"), "{err}");
    }
}

/// A builder method that takes a duration.
type SetDuration = fn(quorumlock::Builder, Duration) -> quorumlock::Builder;

#[tokio::test]
async fn bad_settings_are_refused_at_build() {
    let cluster = cluster(1);
    for factor in [f64::NAN, f64::INFINITY, -0.1, 1.0, 7.0] {
        let result = builder(&cluster).drift_factor(factor).build().await;
        assert!(
            matches!(
                result,
                Err(Error::InvalidConfig {
                    setting: "drift_factor",
                    ..
                })
            ),
            "{factor}: {result:?}"
        );
    }
    let result = builder(&cluster)
        .instance_timeout(Duration::ZERO)
        .build()
        .await;
    assert!(matches!(
        result,
        Err(Error::InvalidConfig {
            setting: "instance_timeout",
            ..
        })
    ));
    let result = builder(&cluster).default_ttl(Duration::ZERO).build().await;
    assert!(matches!(result, Err(Error::InvalidTtl { .. })));
    let result = builder(&cluster).probe_every(Duration::ZERO).build().await;
    assert!(matches!(
        result,
        Err(Error::InvalidConfig {
            setting: "probe_every",
            ..
        })
    ));
    // Absurdly long settings are refused rather than left to overflow later.
    let absurd = Duration::MAX;
    let settings: [(&str, SetDuration); 4] = [
        ("instance_timeout", |b, d| b.instance_timeout(d)),
        ("default_wait", |b, d| b.default_wait(d)),
        ("probe_every", |b, d| b.probe_every(d)),
        ("restart_quarantine", |b, d| b.restart_quarantine(d)),
    ];
    for (name, set) in settings {
        match set(builder(&cluster), absurd).build().await {
            Err(Error::InvalidConfig { setting, .. }) => assert_eq!(setting, name),
            other => panic!("{name}: {other:?}"),
        }
    }
    // The longest accepted ones work without overflow.
    let locker = builder(&cluster)
        .default_wait(MAX_TTL)
        .restart_quarantine(MAX_TTL)
        .instance_timeout(MAX_TTL)
        .build()
        .await
        .unwrap();
    let lock = locker
        .try_acquire("job", Duration::from_secs(1))
        .await
        .unwrap();
    lock.extend(Duration::from_secs(1)).await.unwrap();
    lock.release().await.unwrap();
}

#[tokio::test]
async fn a_non_owner_and_an_expired_owner_change_nothing() {
    let cluster = cluster(3);
    let locker = locker(&cluster).await;
    let rival = locker.clone();
    let short = locker
        .try_acquire("job", Duration::from_millis(50))
        .await
        .unwrap();
    short.lost().await;
    let theirs = rival.acquire("job", Duration::from_secs(10)).await.unwrap();
    locker.settle().await;
    let before = common::values(&cluster, "job").await;
    // The expired owner can neither extend nor release the new owner's lock.
    assert!(matches!(
        short.extend(Duration::from_secs(10)).await,
        Err(Error::LockLost { .. })
    ));
    assert!(matches!(short.release().await, Err(Error::NotHeld { .. })));
    locker.settle().await;
    assert_eq!(common::values(&cluster, "job").await, before);
    theirs.release().await.unwrap();
}

#[test]
fn building_outside_a_runtime_is_an_error_not_a_panic() {
    let build = QuorumLocker::builder().url("redis://127.0.0.1:1").build();
    let result = futures_executor_block_on(build);
    assert!(matches!(result, Err(Error::NoRuntime)), "{result:?}");
}

/// Polls a future to completion on this thread, outside any Tokio runtime.
fn futures_executor_block_on<F: std::future::Future>(future: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    // A runtime that is built but not entered: `Handle::try_current` fails inside
    // plain polling, as it would under another executor.
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut future = std::pin::pin!(future);
    drop(runtime);
    loop {
        if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
    }
}
