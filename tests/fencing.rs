//! Fencing tokens: successive holders of a key get strictly increasing tokens,
//! the write-back round is what makes that hold across quorums, and a storage
//! that refuses stale tokens never takes a write from a holder whose lock has
//! passed on. Real servers, plus memory instances where a fault must land
//! between the two rounds.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::cluster;
use quorumlock::testing::RedisCluster;
use quorumlock::{Error, MemoryInstance, QuorumLocker, Shortfall, Vote};
use tokio::time::Instant;

const KEY: &str = "ledger";

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

async fn memory_locker(instances: &[MemoryInstance]) -> QuorumLocker {
    let locker = instances
        .iter()
        .fold(QuorumLocker::builder(), |builder, instance| {
            builder.memory(instance)
        })
        .retry(quorumlock::RetryPolicy::fixed(ms(5)).with_jitter(0.5))
        .build()
        .await
        .unwrap();
    // Measured before the tests' faults begin.
    locker.prepare().await.unwrap();
    locker
}

fn instances(n: usize) -> Vec<MemoryInstance> {
    (0..n)
        .map(|i| MemoryInstance::new(format!("m{i}")))
        .collect()
}

/// A quorum whose counters differ: without the write-back, the next holder's
/// quorum, which meets this one only where the counter was low, would hand out
/// a smaller token.
#[tokio::test(start_paused = true)]
async fn the_write_back_carries_the_token_to_the_whole_quorum() {
    let m = instances(3);
    let locker = memory_locker(&m).await;
    m[0].set("ledger:fence", "41", None);

    m[2].set_failing(true);
    let first = locker.lock(KEY).fenced().try_acquire().await.unwrap();
    assert_eq!(
        first.fencing_token(),
        Some(42),
        "the largest granting counter"
    );
    // The write-back raised the lagging counter of the quorum to the token.
    assert_eq!(m[1].get("ledger:fence").as_deref(), Some("42"));
    first.release().await.unwrap();
    m[2].set_failing(false);
    // It votes again once a probe has identified it.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The next quorum meets the first one only at m1.
    m[0].set_failing(true);
    let second = locker.lock(KEY).fenced().try_acquire().await.unwrap();
    assert_eq!(second.fencing_token(), Some(43));
    assert_eq!(m[2].get("ledger:fence").as_deref(), Some("43"));
    assert_eq!(m[0].get("ledger:fence").as_deref(), Some("42"));
}

/// A write-back that does not reach a quorum loses the attempt: it is rolled
/// back, no token is handed out, and the counters it advanced only make later
/// tokens larger.
#[tokio::test(start_paused = true)]
async fn a_write_back_short_of_a_quorum_loses_the_attempt() {
    let m = instances(3);
    let locker = memory_locker(&m).await;
    m[2].set_failing(true);
    m[1].set_latency(ms(10));
    // m1 grants the first round (its reply lands at 10 ms), then fails before
    // the write-back reaches it (at 15 ms).
    let failer = m[1].clone();
    tokio::spawn(async move {
        tokio::time::sleep(ms(12)).await;
        failer.set_failing(true);
    });
    let err = locker.lock(KEY).fenced().try_acquire().await.unwrap_err();
    let Error::NotAcquired {
        shortfall, causes, ..
    } = &err
    else {
        panic!("{err}");
    };
    assert_eq!(
        *shortfall,
        Shortfall::FenceNotWritten {
            acknowledged: 1,
            needed: 2
        },
        "{err}"
    );
    assert!(matches!(causes[1].vote, Vote::Failed(_)), "{err}");
    locker.settle().await;
    assert_eq!(m[0].get(KEY), None, "rolled back");
    assert_eq!(
        m[0].get("ledger:fence").as_deref(),
        Some("1"),
        "the INCR stays"
    );

    m[1].set_failing(false);
    m[1].set_latency(Duration::ZERO);
    m[1].remove(KEY); // the failed instance's copy expires in time; hurry it
                      // m1 votes again once a probe has reached it.
                      // (Attempts that m1 did not vote in were lost too, each advancing m0.)
    let lock = locker.lock(KEY).fenced().acquire().await.unwrap();
    assert!(lock.fencing_token().unwrap() >= 2);
}

#[tokio::test(start_paused = true)]
async fn unfenced_locks_have_no_token_and_leave_no_counter() {
    let m = instances(1);
    let locker = memory_locker(&m).await;
    let lock = locker.acquire(KEY, ms(1000)).await.unwrap();
    assert_eq!(lock.fencing_token(), None);
    lock.release().await.unwrap();
    assert!(m[0].keys().is_empty());
}

/// A re-take with the caller's token is a new tenure with a larger token; the
/// extend of a fenced lock keeps its token.
#[tokio::test(start_paused = true)]
async fn a_fenced_retake_gets_a_new_larger_token() {
    let m = instances(3);
    let locker = memory_locker(&m).await;
    let first = locker
        .lock(KEY)
        .token("host-a:job-1")
        .fenced()
        .acquire()
        .await
        .unwrap();
    let t1 = first.fencing_token().unwrap();
    first.extend(ms(5000)).await.unwrap();
    assert_eq!(first.fencing_token(), Some(t1));
    let again = locker
        .lock(KEY)
        .token("host-a:job-1")
        .fenced()
        .try_acquire()
        .await
        .unwrap();
    assert!(again.fencing_token().unwrap() > t1);
    std::mem::forget(first); // its release would no longer match anyway
}

/// A counter someone raised past 2^53 on one instance: Lua holds `INCR`'s
/// answer as a double, so the grant would answer a rounded counter, the
/// write-back would carry it to the quorum, and successive holders would get
/// the same token. The vote fails instead, as for a counter below 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_past_lua_precision_fails_the_vote_rather_than_repeat_tokens() {
    let cluster = cluster(3);
    let locker = common::locker(&cluster).await;
    let mut connection = cluster.connection(0).await.unwrap();
    let fence = format!("{KEY}{}", quorumlock::FENCE_SUFFIX);
    let _: () = redis::AsyncCommands::set(&mut connection, &fence, 1u64 << 60)
        .await
        .unwrap();
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let lock = locker.lock(KEY).fenced().acquire().await.unwrap();
        tokens.push(lock.fencing_token().unwrap());
        lock.release().await.unwrap();
    }
    assert!(
        tokens.windows(2).all(|pair| pair[1] > pair[0]),
        "tokens of successive holders: {tokens:?}"
    );
    locker.settle().await;
    assert_eq!(common::values(&cluster, KEY).await, vec![None, None, None]);
}

/// One tenure: when the holder got the lock, and its token.
#[derive(Debug, Clone, Copy)]
struct Tenure {
    acquired: Instant,
    token: u64,
}

/// Runs `tasks` contenders over `lockers` for `run`, each holding the lock
/// briefly; returns every tenure.
async fn contend(
    lockers: &[QuorumLocker],
    tasks: usize,
    run: Duration,
    during: impl FnOnce() + Send + 'static,
) -> Vec<Tenure> {
    let tenures = Arc::new(Mutex::new(Vec::new()));
    let end = Instant::now() + run;
    let mut handles = Vec::new();
    for task in 0..tasks {
        let locker = lockers[task % lockers.len()].clone();
        let tenures = Arc::clone(&tenures);
        handles.push(tokio::spawn(async move {
            while Instant::now() < end {
                let Ok(lock) = locker
                    .lock(KEY)
                    .ttl(ms(2000))
                    .fenced()
                    .wait(Duration::from_secs(3))
                    .acquire()
                    .await
                else {
                    continue;
                };
                let acquired = Instant::now();
                let token = lock.fencing_token().expect("fenced");
                tenures.lock().unwrap().push(Tenure { acquired, token });
                tokio::time::sleep(ms(2)).await;
                let _ = lock.release().await;
            }
        }));
    }
    tokio::time::sleep(run / 3).await;
    tokio::task::spawn_blocking(during).await.unwrap();
    for handle in handles {
        handle.await.unwrap();
    }
    let mut tenures = tenures.lock().unwrap().clone();
    tenures.sort_by_key(|tenure| tenure.acquired);
    tenures
}

fn assert_increasing(tenures: &[Tenure]) {
    assert!(tenures.len() >= 10, "only {} tenures", tenures.len());
    for pair in tenures.windows(2) {
        assert!(
            pair[1].token > pair[0].token,
            "token went from {} to {} between successive holders",
            pair[0].token,
            pair[1].token
        );
    }
}

async fn lockers(cluster: &RedisCluster) -> Vec<QuorumLocker> {
    lockers_for(cluster.urls()).await
}

async fn lockers_for(urls: Vec<String>) -> Vec<QuorumLocker> {
    let mut lockers = Vec::new();
    for _ in 0..2 {
        lockers.push(
            QuorumLocker::builder()
                .urls(urls.clone())
                .default_wait(Duration::from_secs(5))
                .instance_timeout(ms(500))
                .retry(quorumlock::RetryPolicy::fixed(ms(10)).with_jitter(0.5))
                .build()
                .await
                .unwrap(),
        );
    }
    lockers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_successive_holders_increase_under_contention() {
    for n in [3, 5] {
        let cluster = cluster(n);
        let lockers = lockers(&cluster).await;
        let tenures = contend(&lockers, 6, ms(1500), || {}).await;
        assert_increasing(&tenures);
    }
}

/// A minority killed, then restarted empty mid-run: the restarted server lost
/// its counter, but the restart quarantine keeps it from voting, and every
/// quorum of the rest still meets the last write-back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_increase_with_a_minority_killed_and_restarted() {
    let cluster = Arc::new(Mutex::new(cluster(5)));
    let urls = cluster.lock().unwrap().urls();
    let lockers = lockers_for(urls).await;
    let faults = Arc::clone(&cluster);
    let tenures = contend(&lockers, 6, ms(3000), move || {
        let mut cluster = faults.lock().unwrap();
        cluster.kill(0).unwrap();
        cluster.kill(3).unwrap();
        drop(cluster);
        std::thread::sleep(ms(500));
        let mut cluster = faults.lock().unwrap();
        cluster.restart_empty(0).unwrap();
        cluster.restart_empty(3).unwrap();
    })
    .await;
    assert_increasing(&tenures);
}

/// The storage a fenced lock protects: it keeps the highest token it has seen
/// and refuses writes with a lower one.
#[derive(Default)]
struct Storage {
    highest: u64,
    /// `(when, token)` of every accepted write.
    accepted: Vec<(Instant, u64)>,
}

impl Storage {
    fn write(&mut self, token: u64) -> bool {
        if token < self.highest {
            return false;
        }
        self.highest = token;
        self.accepted.push((Instant::now(), token));
        true
    }
}

/// Holders that pause past their validity (no extend) before their second write
/// must be refused once a later holder has written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_holder_is_refused_by_the_storage() {
    let cluster = cluster(3);
    let lockers = lockers(&cluster).await;
    let storage = Arc::new(Mutex::new(Storage::default()));
    // `(acquired, first write accepted at, token)` of every holder.
    let firsts = Arc::new(Mutex::new(Vec::<(Instant, Instant, u64)>::new()));
    let violations = Arc::new(Mutex::new(Vec::new()));
    let refused_stale = Arc::new(Mutex::new(0usize));
    let end = Instant::now() + ms(3000);
    let ttl = ms(150);
    let mut handles = Vec::new();
    for task in 0..4usize {
        let locker = lockers[task % 2].clone();
        let (storage, firsts) = (Arc::clone(&storage), Arc::clone(&firsts));
        let (violations, refused_stale) = (Arc::clone(&violations), Arc::clone(&refused_stale));
        handles.push(tokio::spawn(async move {
            let mut round = 0u64;
            while Instant::now() < end {
                round += 1;
                let Ok(lock) = locker.lock(KEY).ttl(ttl).fenced().acquire().await else {
                    continue;
                };
                let acquired = Instant::now();
                let token = lock.fencing_token().unwrap();
                let accepted = storage.lock().unwrap().write(token);
                assert!(accepted, "a fresh holder's token {token} was refused");
                firsts
                    .lock()
                    .unwrap()
                    .push((acquired, Instant::now(), token));
                // Every other round, a "GC pause" well past the validity.
                let pause = if (round + task as u64).is_multiple_of(2) {
                    ttl * 3
                } else {
                    ms(3)
                };
                tokio::time::sleep(pause).await;
                let mut store = storage.lock().unwrap();
                let now = Instant::now();
                // Passed on: a holder that acquired after us has already written.
                let passed = firsts
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|&(their_acquire, written, _)| their_acquire > acquired && written < now);
                let accepted = store.write(token);
                drop(store);
                if passed && accepted {
                    violations.lock().unwrap().push(token);
                }
                if passed && !accepted {
                    *refused_stale.lock().unwrap() += 1;
                }
                drop(lock);
            }
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    assert!(
        violations.lock().unwrap().is_empty(),
        "stale writes accepted: {:?}",
        violations.lock().unwrap()
    );
    let refused = *refused_stale.lock().unwrap();
    assert!(refused >= 1, "no holder's lock passed on while it paused");
    // Accepted tokens never go down.
    let accepted = storage.lock().unwrap().accepted.clone();
    assert!(accepted.windows(2).all(|pair| pair[1].1 >= pair[0].1));
}
