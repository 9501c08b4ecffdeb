//! Workers contending for a few keys through faults: each its own locker as
//! given (fresh, at the defaults, no `prepare`), taking fenced locks with a
//! short TTL and wait, holding each 5 ms, and recording every tenure in one
//! checker, until stopped (or 5 000 rounds each).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quorumlock::testing::Checker;
use quorumlock::QuorumLocker;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Each lock's TTL.
pub const TTL: Duration = Duration::from_millis(800);
/// How long each acquire waits.
pub const WAIT: Duration = Duration::from_millis(300);

/// The running workers.
pub struct Workers {
    pub checker: Checker,
    stop: Arc<AtomicBool>,
    longest: Arc<Mutex<Duration>>,
    handles: Vec<JoinHandle<usize>>,
}

/// What they did.
pub struct Done {
    pub checker: Checker,
    /// Locks held, over all workers.
    pub held: usize,
    /// The longest `acquire` call, won or not.
    pub longest: Duration,
}

/// Starts one worker per locker on `keys` (worker `i` starts at key `i`).
pub fn start(lockers: Vec<QuorumLocker>, keys: &'static [&'static str]) -> Workers {
    let checker = Checker::new();
    let stop = Arc::new(AtomicBool::new(false));
    let longest = Arc::new(Mutex::new(Duration::ZERO));
    let handles = lockers
        .into_iter()
        .enumerate()
        .map(|(worker, locker)| {
            let (checker, stop, longest) =
                (checker.clone(), Arc::clone(&stop), Arc::clone(&longest));
            tokio::spawn(async move {
                let mut held = 0;
                for round in 0..5_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = keys[(worker + round) % keys.len()];
                    let asked = Instant::now();
                    let attempt = locker
                        .lock(key)
                        .ttl(TTL)
                        .wait(WAIT)
                        .fenced()
                        .acquire()
                        .await;
                    {
                        let mut longest = longest.lock().unwrap();
                        *longest = (*longest).max(asked.elapsed());
                    }
                    let Ok(lock) = attempt else { continue };
                    let start = Instant::now();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    let end = Instant::now().min(lock.valid_until());
                    checker.record_fenced(key, worker, start, end, lock.fencing_token());
                    let _ = lock.release().await;
                    held += 1;
                }
                locker.settle().await;
                held
            })
        })
        .collect();
    Workers {
        checker,
        stop,
        longest,
        handles,
    }
}

impl Workers {
    /// Stops the workers and waits for them (and their background work).
    pub async fn stop(self) -> Done {
        self.stop.store(true, Ordering::Relaxed);
        let mut held = 0;
        for handle in self.handles {
            held += handle.await.expect("a worker panicked");
        }
        let longest = *self.longest.lock().unwrap();
        Done {
            checker: self.checker,
            held,
            longest,
        }
    }
}

impl Done {
    /// No two holders of a key at once, no fencing token out of order, and at
    /// least `at_least` locks held (a run that locked little proves little).
    pub fn assert_safe(&self, at_least: usize) {
        let violations = self.checker.violations();
        assert!(violations.is_empty(), "{violations:?}");
        let stale = self.checker.stale_tokens();
        assert!(stale.is_empty(), "{stale:?}");
        assert!(self.held > at_least, "only {} locks held", self.held);
    }
}
