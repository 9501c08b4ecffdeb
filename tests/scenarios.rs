//! The fault suite: every scenario through the mutual-exclusion checker against
//! real servers, counting acquisitions, violations, keys left behind and the
//! longest call.
//!
//! CI runs each scenario for about two seconds. `QUORUMLOCK_SOAK=1` runs each to
//! 10 000 acquisitions and prints the table in docs/SAFETY.md:
//! `QUORUMLOCK_SOAK=1 cargo test --release --test scenarios -- --nocapture --test-threads 1`.

use std::time::Duration;

use quorumlock::testing::{Fault, Report, Scenario};

const MINORITY: [usize; 2] = [3, 4];
const MAJORITY: [usize; 3] = [2, 3, 4];

fn soak() -> bool {
    std::env::var_os("QUORUMLOCK_SOAK").is_some()
}

fn scenario(name: &str, fault: Fault) -> Scenario {
    let mut scenario = Scenario::new(name, fault);
    if soak() {
        scenario.acquisitions = 10_000;
        scenario.duration = Duration::from_secs(600);
        scenario.keys = 16;
        scenario.tasks = 6;
        scenario.hold_to_validity = 0.1;
    } else {
        scenario.duration = Duration::from_secs(2);
        // Enough keys that default 100 ms retries still leave a few dozen
        // tenures per run.
        scenario.keys = 6;
    }
    scenario
}

async fn run(scenario: Scenario) -> Report {
    let report = scenario.run().await.expect("start the scenario");
    println!("{}", report.row());
    eprintln!("{report}");
    report
}

/// What must hold whenever the timing assumptions do.
#[track_caller]
fn assert_safe(report: &Report, scenario: &Scenario) {
    assert!(report.violations.is_empty(), "{report}");
    assert_eq!(report.keys_left, 0, "{report}");
    assert!(report.acquisitions > 0, "{report}");
    // No hang: every call returned within its wait plus a per-instance timeout,
    // with generous slack for a loaded machine.
    let bound = scenario.ttl * 2 + scenario.instance_timeout + Duration::from_secs(2);
    assert!(report.longest_call <= bound, "{report}");
}

macro_rules! safe_scenario {
    ($test:ident, $name:expr, $fault:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            let scenario = scenario($name, $fault);
            let report = run(scenario.clone()).await;
            assert_safe(&report, &scenario);
        }
    };
}

safe_scenario!(no_fault, "no fault", Fault::None);
safe_scenario!(
    minority_killed,
    "2 of 5 killed",
    Fault::Kill(MINORITY.to_vec())
);
safe_scenario!(
    minority_paused,
    "2 of 5 paused",
    Fault::Pause(MINORITY.to_vec())
);
safe_scenario!(
    latency,
    "2 of 5 at 20 ms ± 10 ms",
    Fault::Latency {
        on: MINORITY.to_vec(),
        latency: Duration::from_millis(20),
        jitter: Duration::from_millis(10),
    }
);
safe_scenario!(
    latency_spikes,
    "latency spikes of 150 ms on 3 of 5",
    Fault::Spikes {
        on: MAJORITY.to_vec(),
        spike: Duration::from_millis(150),
        every: Duration::from_millis(500),
    }
);
safe_scenario!(
    partition_and_heal,
    "2 of 5 partitioned 200 ms in every 500 ms",
    Fault::Partition {
        on: MINORITY.to_vec(),
        cut: Duration::from_millis(200),
        every: Duration::from_millis(500),
    }
);
safe_scenario!(
    restart_while_holding,
    "1 of 5 restarted empty every 400 ms",
    Fault::RestartEmpty {
        on: 4,
        every: Duration::from_millis(400),
    }
);

macro_rules! clock_scenario {
    ($test:ident, $rate:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            for (who, on) in [("2 of 5", MINORITY.to_vec()), ("3 of 5", MAJORITY.to_vec())] {
                let fault = Fault::ClockRate { on, rate: $rate };
                let scenario = scenario(&format!("{who} at clock rate {}", $rate), fault);
                let report = run(scenario.clone()).await;
                assert_safe(&report, &scenario);
            }
        }
    };
}

clock_scenario!(clocks_at_half_speed, 0.5);
clock_scenario!(clocks_one_percent_slow, 0.99);
clock_scenario!(clocks_half_a_percent_fast, 1.005);
clock_scenario!(clocks_one_percent_fast, 1.01);
clock_scenario!(clocks_ten_percent_fast, 1.1);
clock_scenario!(clocks_twice_as_fast, 2.0);

/// The start-up window, over and over: every acquisition by a locker built just
/// before it, with 2 or 3 of 5 clocks at 2.0. The acquire latency is the time to
/// a first lock, build included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_lockers_with_fast_clocks() {
    for (who, on) in [("2 of 5", MINORITY.to_vec()), ("3 of 5", MAJORITY.to_vec())] {
        let fault = Fault::ClockRate { on, rate: 2.0 };
        let mut scenario = scenario(
            &format!("start-up: a fresh locker per acquisition, {who} at clock rate 2"),
            fault,
        );
        scenario.fresh_lockers = true;
        let report = run(scenario.clone()).await;
        assert_safe(&report, &scenario);
    }
}

/// Fast clocks that NTP steps back: each step makes the stepped interval look
/// slow; the locker measures afresh instead of trusting the clock more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_clocks_stepped_back() {
    for (who, on) in [("2 of 5", MINORITY.to_vec()), ("3 of 5", MAJORITY.to_vec())] {
        let fault = Fault::ClockSteps {
            on,
            rate: 2.0,
            step_ms: 300,
            every: Duration::from_millis(700),
        };
        let scenario = scenario(
            &format!("{who} at clock rate 2, stepped back 300 ms every 700 ms"),
            fault,
        );
        let report = run(scenario.clone()).await;
        assert_safe(&report, &scenario);
    }
}

/// The checker can see a violation: plain Redlock (defences off) under a majority
/// of fast clocks overlaps, as measured for the Redlock peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_defences_fast_clocks_break_mutual_exclusion() {
    for (who, on) in [("2 of 5", MINORITY.to_vec()), ("3 of 5", MAJORITY.to_vec())] {
        let mut scenario = scenario(
            &format!("{who} at clock rate 2.0, defences off"),
            Fault::ClockRate { on, rate: 2.0 },
        );
        scenario.defences = false;
        let report = run(scenario).await;
        if who == "3 of 5" {
            assert!(!report.violations.is_empty(), "{report}");
        }
        assert_eq!(report.keys_left, 0, "{report}");
    }
}
