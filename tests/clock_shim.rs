//! The clock shim on real redis-server processes: key expiry and `TIME` follow the
//! configured rate, rate changes apply at once without time going back, and the server
//! keeps working.
//!
//! Real time is what is measured here, so these tests sleep; every wait is bounded and
//! tolerances allow for a loaded two-core machine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use quorumlock::testing::{HarnessError, RedisCluster, RedisServer};

/// Rates measured over half a second must be within this fraction of the setting.
const TOLERANCE: f64 = 0.15;
/// Longer than any reply takes, even on a loaded machine; a hung server fails instead.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

fn connect(server: &RedisServer) -> redis::Connection {
    connect_url(&server.url())
}

fn connect_url(url: &str) -> redis::Connection {
    let client = redis::Client::open(url).expect("client");
    let connection = client
        .get_connection_with_timeout(REPLY_TIMEOUT)
        .expect("connect");
    connection
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .expect("read timeout");
    connection
        .set_write_timeout(Some(REPLY_TIMEOUT))
        .expect("write timeout");
    connection
}

/// The server's `TIME` in microseconds, paired with the real instant halfway through
/// the round trip.
fn sample(connection: &mut redis::Connection) -> (Instant, i64) {
    let sent = Instant::now();
    let (seconds, micros): (i64, i64) = redis::cmd("TIME").query(connection).expect("TIME");
    let received = Instant::now();
    (sent + (received - sent) / 2, seconds * 1_000_000 + micros)
}

/// Server time per real time between two samples.
fn rate_between(a: (Instant, i64), b: (Instant, i64)) -> f64 {
    (b.1 - a.1) as f64 / (b.0 - a.0).as_micros() as f64
}

fn measure_rate(connection: &mut redis::Connection, window: Duration) -> f64 {
    let start = sample(connection);
    thread::sleep(window);
    rate_between(start, sample(connection))
}

fn assert_rate(measured: f64, expected: f64, what: &str) {
    let (low, high) = (expected * (1.0 - TOLERANCE), expected * (1.0 + TOLERANCE));
    assert!(
        (low..=high).contains(&measured),
        "{what}: measured rate {measured:.3}, expected {expected} ± {TOLERANCE}"
    );
}

fn exists(connection: &mut redis::Connection, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query(connection)
        .expect("EXISTS")
}

/// Sleeps until `offset` after `start` (at once if that has passed).
fn sleep_until(start: Instant, offset: Duration) {
    thread::sleep((start + offset).saturating_duration_since(Instant::now()));
}

#[test]
fn a_px_key_lives_half_as_long_on_a_double_speed_server() {
    let cluster = RedisCluster::start_each(&[
        RedisServer::builder().clock_rate(2.0),
        RedisServer::builder().clock_rate(1.0),
    ])
    .expect("start");
    let mut fast = connect(cluster.server(0));
    let mut normal = connect(cluster.server(1));
    let set = |connection: &mut redis::Connection| {
        let _: () = redis::cmd("SET")
            .arg(&["clock:key", "v", "PX", "2000"])
            .query(connection)
            .expect("SET");
    };

    // Both SETs complete between `start` and `set_done`.
    let start = Instant::now();
    set(&mut fast);
    set(&mut normal);
    let set_done = Instant::now();

    sleep_until(start, Duration::from_millis(800));
    let present = exists(&mut fast, "clock:key");
    // Gone only if ≥ 1000 ms passed since SET: then this check came too late to count.
    let present_at = start.elapsed();
    assert!(
        present || present_at >= Duration::from_millis(1000),
        "key gone after {present_at:?} at rate 2.0 (its 2000 ms need 1000 ms)"
    );

    sleep_until(set_done, Duration::from_millis(1150));
    let gone = !exists(&mut fast, "clock:key");
    let checked = set_done.elapsed();
    assert!(gone, "key still there {checked:?} after SET at rate 2.0");
    println!("rate 2.0: PX 2000 key present at {present_at:?}, gone at {checked:?}");

    sleep_until(start, Duration::from_millis(1700));
    let present = exists(&mut normal, "clock:key");
    let checked = start.elapsed();
    assert!(
        present || checked >= Duration::from_millis(2000),
        "key gone after {checked:?} at rate 1.0"
    );
}

#[test]
fn time_advances_at_the_configured_rate() {
    let rates = [2.0, 0.5, 1.0];
    let builders: Vec<_> = rates
        .iter()
        .map(|&rate| RedisServer::builder().clock_rate(rate))
        .collect();
    let cluster = RedisCluster::start_each(&builders).expect("start");
    // Sample the servers together, so the three windows overlap.
    let mut connections: Vec<_> = cluster.servers().iter().map(connect).collect();
    let starts: Vec<_> = connections.iter_mut().map(sample).collect();
    thread::sleep(Duration::from_millis(500));
    for ((connection, start), rate) in connections.iter_mut().zip(starts).zip(rates) {
        let measured = rate_between(start, sample(connection));
        println!("rate {rate}: TIME advanced at {measured:.4}× real time over 500 ms");
        assert_rate(measured, rate, &format!("server at rate {rate}"));
    }
}

/// Samples `TIME` on its own connection every couple of milliseconds until stopped.
fn sample_continuously(url: &str, stop: &AtomicBool) -> Vec<(Instant, i64)> {
    let mut connection = connect_url(url);
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        samples.push(sample(&mut connection));
        thread::sleep(Duration::from_millis(2));
    }
    samples
}

/// The rate over the samples taken within `from..to`.
fn rate_within(samples: &[(Instant, i64)], from: Instant, to: Instant) -> f64 {
    let inside: Vec<_> = samples
        .iter()
        .filter(|(real, _)| (from..to).contains(real))
        .collect();
    assert!(
        inside.len() >= 10,
        "only {} samples in window",
        inside.len()
    );
    rate_between(*inside[0], **inside.last().expect("samples"))
}

#[test]
fn a_rate_change_applies_at_once_and_time_never_goes_back() {
    let mut cluster =
        RedisCluster::start_with(2, &RedisServer::builder().clock_rate(1.0)).expect("start");
    let stop = AtomicBool::new(false);
    let url = cluster.server(1).url();
    let mut changes = Vec::new();
    let samples = thread::scope(|scope| {
        let sampler = scope.spawn(|| sample_continuously(&url, &stop));
        let mut other = connect(cluster.server(0));
        let other_start = sample(&mut other);
        thread::sleep(Duration::from_millis(300));
        for rate in [3.0, 0.5, 2.0] {
            let called = Instant::now();
            cluster.set_clock_rate(1, rate).expect("set rate");
            let returned = Instant::now();
            assert_eq!(cluster.server(1).clock_rate(), Some(rate));
            changes.push((rate, called, returned));
            thread::sleep(Duration::from_millis(600));
        }
        let other_rate = rate_between(other_start, sample(&mut other));
        stop.store(true, Ordering::Relaxed);
        (sampler.join().expect("sampler"), other_rate)
    });
    let (samples, other_rate) = samples;

    for pair in samples.windows(2) {
        assert!(
            pair[1].1 >= pair[0].1,
            "TIME went back by {} µs",
            pair[0].1 - pair[1].1
        );
    }
    for (rate, called, returned) in changes {
        // From 100 ms after the call: the new rate must be in force by then.
        let measured = rate_within(
            &samples,
            called + Duration::from_millis(100),
            called + Duration::from_millis(600),
        );
        println!(
            "set_clock_rate({rate}) returned after {:?}; then measured {measured:.4}",
            returned - called
        );
        assert_rate(measured, rate, &format!("after set_clock_rate({rate})"));
    }
    assert_eq!(cluster.server(0).clock_rate(), Some(1.0));
    assert_rate(other_rate, 1.0, "the server left at 1.0");
}

#[test]
fn a_clock_offset_steps_the_wall_clock_and_expires_keys() {
    let mut server = RedisServer::builder()
        .clock_offset_ms(-60_000)
        .start()
        .expect("start");
    assert_eq!(server.clock_rate(), Some(1.0));
    assert_eq!(server.clock_offset_ms(), Some(-60_000));
    let mut connection = connect(&server);
    let now_us = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_micros() as i64
    };
    let behind = now_us() - sample(&mut connection).1;
    assert!(
        (59_000_000..61_000_000).contains(&behind),
        "server clock {behind} µs behind, expected 60 s"
    );

    let _: () = redis::cmd("SET")
        .arg(&["clock:offset", "v", "PX", "3000"])
        .query(&mut connection)
        .expect("SET");
    let before = sample(&mut connection).1;
    server.set_clock_offset_ms(-55_000).expect("step forward");
    let step = sample(&mut connection).1 - before;
    assert!(
        (4_900_000..5_500_000).contains(&step),
        "TIME stepped {step} µs, expected 5 s"
    );
    assert!(
        !exists(&mut connection, "clock:offset"),
        "a 5 s step must expire a 3 s key"
    );
    assert_eq!(server.clock_offset_ms(), Some(-55_000));
    // The rate is untouched by the step.
    assert_rate(
        measure_rate(&mut connection, Duration::from_millis(300)),
        1.0,
        "after the step",
    );
}

#[test]
fn the_server_answers_normally_at_slow_and_fast_rates() {
    let rates = [0.5, 2.0];
    let builders: Vec<_> = rates
        .iter()
        .map(|&rate| RedisServer::builder().clock_rate(rate))
        .collect();
    let cluster = RedisCluster::start_each(&builders).expect("start");
    for (server, rate) in cluster.servers().iter().zip(rates) {
        let mut connection = connect(server);
        let started = Instant::now();
        for i in 0..100 {
            let key = format!("clock:load:{i}");
            let _: () = redis::cmd("SET")
                .arg(&key)
                .arg(i)
                .arg("PX")
                .arg(60_000)
                .query(&mut connection)
                .expect("SET");
            let value: i64 = redis::cmd("INCR")
                .arg(&key)
                .query(&mut connection)
                .expect("INCR");
            assert_eq!(value, i + 1);
            let ttl: i64 = redis::cmd("PTTL")
                .arg(&key)
                .query(&mut connection)
                .expect("PTTL");
            assert!((0..=60_000).contains(&ttl), "PTTL {ttl}");
        }
        // A blocking command's timeout runs on the server's clock, its wait in real time.
        let blpop_started = Instant::now();
        let popped: Option<(String, String)> = redis::cmd("BLPOP")
            .arg(&["clock:nothing", "0.2"])
            .query(&mut connection)
            .expect("BLPOP");
        let blpop = blpop_started.elapsed();
        assert_eq!(popped, None);
        let pong: String = redis::cmd("PING").query(&mut connection).expect("PING");
        assert_eq!(pong, "PONG");
        println!(
            "rate {rate}: 300 commands in {:?}; BLPOP with a 0.2 s timeout returned after \
             {blpop:?}",
            blpop_started - started
        );
        // 0.2 s of server time is 0.4 s at rate 0.5, 0.1 s at 2.0, plus Redis's
        // timeout-check granularity.
        assert!(blpop < Duration::from_millis(1500), "BLPOP took {blpop:?}");
    }
}

#[test]
fn restart_empty_keeps_the_shim_and_the_current_rate() {
    let mut server = RedisServer::builder()
        .clock_rate(1.0)
        .start()
        .expect("start");
    server.set_clock_rate(2.0).expect("set rate");
    server.restart_empty().expect("restart");
    assert_eq!(server.clock_rate(), Some(2.0));
    let measured = measure_rate(&mut connect(&server), Duration::from_millis(500));
    assert_rate(measured, 2.0, "after restart_empty");

    // A killed server takes the change when it comes back.
    server.kill().expect("kill");
    server.set_clock_rate(0.5).expect("set rate while killed");
    server.restart_empty().expect("restart");
    let measured = measure_rate(&mut connect(&server), Duration::from_millis(500));
    assert_rate(measured, 0.5, "set while killed, after restart_empty");
}

#[test]
fn a_callers_ld_preload_is_kept_beside_the_shim() {
    const MARKER: &str = "quorumlock-clock-marker";
    let server = RedisServer::builder()
        .env("LD_PRELOAD", format!("/nonexistent/{MARKER}.so"))
        .clock_rate(2.0)
        .start()
        .expect("start");
    // The dynamic loader reports the missing library on stderr, which the log captures.
    let log = std::fs::read_to_string(server.log_path().expect("log")).expect("read log");
    assert!(
        log.contains(MARKER),
        "caller's LD_PRELOAD dropped; log:\n{log}"
    );
    let measured = measure_rate(&mut connect(&server), Duration::from_millis(300));
    assert_rate(measured, 2.0, "with a second preload");
}

#[test]
fn invalid_settings_and_unshimmed_servers_are_typed_errors() {
    for rate in [
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        0.0,
        -1.0,
        1e-4,
        1e4,
    ] {
        let error = RedisServer::builder()
            .clock_rate(rate)
            .start()
            .expect_err("invalid rate");
        assert!(
            matches!(error, HarnessError::InvalidClockRate { .. }),
            "rate {rate}: {error}"
        );
    }
    let error = RedisServer::builder()
        .clock_offset_ms(i64::MAX)
        .start()
        .expect_err("invalid offset");
    assert!(
        matches!(error, HarnessError::InvalidClockOffset { .. }),
        "{error}"
    );

    let mut plain = RedisServer::start().expect("start");
    assert_eq!(plain.clock_rate(), None);
    assert_eq!(plain.clock_offset_ms(), None);
    let error = plain.set_clock_rate(2.0).expect_err("no shim");
    assert!(matches!(error, HarnessError::NoClockShim { .. }), "{error}");
    assert!(error.to_string().contains("clock_rate(1.0)"), "{error}");

    let mut shimmed = RedisServer::builder()
        .clock_rate(1.5)
        .start()
        .expect("start");
    for rate in [f64::NAN, 0.0, -2.0, f64::INFINITY] {
        let error = shimmed.set_clock_rate(rate).expect_err("invalid rate");
        assert!(
            matches!(error, HarnessError::InvalidClockRate { .. }),
            "{error}"
        );
    }
    let error = shimmed
        .set_clock_offset_ms(-i64::MAX)
        .expect_err("invalid offset");
    assert!(
        matches!(error, HarnessError::InvalidClockOffset { .. }),
        "{error}"
    );
    assert_eq!(shimmed.clock_rate(), Some(1.5));
    assert_eq!(shimmed.clock_offset_ms(), Some(0));
}

/// Run by `a_missing_compiler_is_an_error_that_says_what_to_install` in a child process
/// that has no compiler on `PATH` and an empty shim cache.
#[test]
fn missing_compiler_helper() {
    if std::env::var_os("QUORUMLOCK_MISSING_COMPILER_HELPER").is_none() {
        return;
    }
    let error = RedisServer::builder()
        .clock_rate(2.0)
        .start()
        .expect_err("no compiler can be found");
    let message = error.to_string();
    assert!(matches!(error, HarnessError::ClockShim { .. }), "{message}");
    assert!(message.contains("apt-get install -y gcc"), "{message}");
    // A server without the shim needs no compiler.
    RedisServer::start().expect("start without the shim");
    println!("helper-checked");
}

#[test]
fn a_missing_compiler_is_an_error_that_says_what_to_install() {
    let Some(redis_server) = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("redis-server"))
            .find(|candidate| candidate.is_file())
    }) else {
        panic!("redis-server not on PATH");
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos();
    let tmp = std::env::temp_dir().join(format!(
        "quorumlock-clock-test-{}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir(&tmp).expect("create TMPDIR");
    let output = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "missing_compiler_helper", "--nocapture"])
        .env("QUORUMLOCK_MISSING_COMPILER_HELPER", "1")
        .env("PATH", "/nonexistent")
        .env("REDIS_SERVER_BIN", redis_server)
        // An empty cache: a shim built earlier would need no compiler.
        .env("TMPDIR", &tmp)
        .output()
        .expect("run helper");
    let _ = std::fs::remove_dir_all(&tmp);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("helper-checked"),
        "helper failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
