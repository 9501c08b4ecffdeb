//! The `qlock` binary, run for real against local `redis-server` processes.

use std::process::{Child, Command as StdCommand, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use assert_cmd::Command;
use quorumlock::testing::RedisCluster;
use quorumlock::QuorumLocker;

const QLOCK: &str = env!("CARGO_BIN_EXE_qlock");
/// No single invocation here should come near it; it only turns a hang into a
/// failure.
const INVOCATION_TIMEOUT: Duration = Duration::from_secs(20);

fn cluster() -> RedisCluster {
    RedisCluster::start(3).expect("start 3 redis-server processes")
}

/// `qlock` pointed at `urls` and nothing from the caller's environment.
fn qlock(urls: &[String]) -> Command {
    let mut command = Command::new(QLOCK);
    command
        .env("QLOCK_REDIS_URLS", urls.join(","))
        .env_remove("QLOCK_KEY_PREFIX")
        .timeout(INVOCATION_TIMEOUT);
    for var in TLS_VARS {
        command.env_remove(var);
    }
    command
}

/// The TLS options' variables, which the caller's environment may set.
const TLS_VARS: [&str; 4] = [
    "QLOCK_TLS_CA",
    "QLOCK_TLS_CERT",
    "QLOCK_TLS_KEY",
    "QLOCK_TLS_INSECURE",
];

/// The same, as a background process.
fn spawn_qlock(urls: &[String], args: &[&str]) -> Child {
    let mut command = StdCommand::new(QLOCK);
    command
        .args(args)
        .env("QLOCK_REDIS_URLS", urls.join(","))
        .env_remove("QLOCK_KEY_PREFIX");
    for var in TLS_VARS {
        command.env_remove(var);
    }
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qlock")
}

/// Waits for `child` at most `limit`, killing it if it takes longer.
fn wait_at_most(mut child: Child, limit: Duration) -> (Output, Duration) {
    let started = Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let output = child.wait_with_output().expect("wait");
            panic!(
                "qlock still running after {limit:?}; stderr: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed();
    (child.wait_with_output().expect("wait"), elapsed)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An error report is one `qlock: error:` line and never a panic.
fn assert_one_line_error(output: &Output, contains: &str) {
    let stderr = text(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.starts_with("qlock: error: "), "{stderr}");
    assert!(stderr.contains(contains), "{contains:?} not in {stderr}");
}

/// GET on every instance.
fn values(urls: &[String], key: &str) -> Vec<Option<String>> {
    urls.iter()
        .map(|url| {
            let mut connection = redis::Client::open(url.as_str())
                .and_then(|client| client.get_connection())
                .expect("connect");
            redis::cmd("GET")
                .arg(key)
                .query(&mut connection)
                .expect("GET")
        })
        .collect()
}

/// Polls until a quorum of instances hold `key`.
fn wait_until_held(urls: &[String], key: &str) {
    let started = Instant::now();
    while values(urls, key).iter().filter(|v| v.is_some()).count() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{key} never taken"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn send_signal(child: &Child, signal: &str) {
    let status = StdCommand::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

#[test]
fn exit_status_and_output_pass_through() {
    let cluster = cluster();
    let urls = cluster.urls();
    qlock(&urls)
        .args(["run", "--key", "pass", "--", "sh", "-c", "echo out; exit 7"])
        .assert()
        .code(7)
        .stdout("out\n");
    qlock(&urls)
        .args(["run", "--key", "pass", "--", "true"])
        .assert()
        .code(0);
    // Signal death is 128 + the signal, as in a shell (SIGUSR1 is 10).
    qlock(&urls)
        .args(["run", "--key", "pass", "--", "sh", "-c", "kill -USR1 $$"])
        .assert()
        .code(138);
    // Without `--`, options up to the command are qlock's, the rest the command's.
    qlock(&urls)
        .args(["run", "--key", "pass", "sh", "-c", "echo $0", "--ttl"])
        .assert()
        .code(0)
        .stdout("--ttl\n");
    let missing = qlock(&urls)
        .args(["run", "--key", "pass", "--", "/nonexistent/command"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(127));
    assert_one_line_error(&missing, "cannot run");
    // Every lock above was released.
    assert!(values(&urls, "pass").iter().all(Option::is_none));
}

#[test]
fn concurrent_runs_never_overlap() {
    let cluster = cluster();
    let urls = cluster.urls();
    let log = std::env::temp_dir().join(format!("qlock-overlap-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let script =
        r#"echo "$0 start $(date +%s%N)" >> "$1"; sleep 0.2; echo "$0 end $(date +%s%N)" >> "$1""#;
    let runs: Vec<Child> = (0..4)
        .map(|i| {
            let id = i.to_string();
            let log = log.to_str().unwrap();
            spawn_qlock(
                &urls,
                &[
                    "run", "--key", "overlap", "--wait", "20s", "--", "sh", "-c", script, &id, log,
                ],
            )
        })
        .collect();
    for run in runs {
        let (output, _) = wait_at_most(run, INVOCATION_TIMEOUT);
        assert!(output.status.success(), "{}", text(&output.stderr));
    }
    let contents = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    let mut intervals: Vec<(u128, u128)> = (0..4)
        .map(|i| {
            let at = |event: &str| -> u128 {
                let prefix = format!("{i} {event} ");
                let line = contents
                    .lines()
                    .find(|line| line.starts_with(&prefix))
                    .unwrap_or_else(|| panic!("no {prefix:?} in {contents}"));
                line[prefix.len()..].trim().parse().unwrap()
            };
            (at("start"), at("end"))
        })
        .collect();
    intervals.sort_unstable();
    for pair in intervals.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "runs overlap: {pair:?} in\n{contents}"
        );
    }
}

#[test]
fn an_expired_wait_exits_75() {
    let cluster = cluster();
    let urls = cluster.urls();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let lock = runtime.block_on(async {
        let locker = QuorumLocker::builder()
            .urls(urls.clone())
            .build()
            .await
            .unwrap();
        locker
            .lock("busy")
            .ttl(Duration::from_secs(30))
            .metadata("held-by-the-test")
            .acquire()
            .await
            .unwrap()
    });
    let started = Instant::now();
    let output = qlock(&urls)
        .args([
            "run", "--key", "busy", "--wait", "300ms", "--", "echo", "never",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(75), "{}", text(&output.stderr));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(text(&output.stdout), "");
    // It says who holds the lock.
    assert_one_line_error(&output, "held-by-the-test");
    runtime.block_on(lock.release()).unwrap();
}

#[test]
fn a_lost_lock_stops_the_command_and_exits_74() {
    let cluster = cluster();
    let urls = cluster.urls();
    let run = spawn_qlock(
        &urls,
        &[
            "run", "--key", "doomed", "--ttl", "1500ms", "--grace", "2s", "--", "sleep", "30",
        ],
    );
    wait_until_held(&urls, "doomed");
    // Behind its back: a majority forgets the key.
    for url in &urls[..2] {
        let mut connection = redis::Client::open(url.as_str())
            .and_then(|client| client.get_connection())
            .unwrap();
        let _: i64 = redis::cmd("DEL")
            .arg("doomed")
            .query(&mut connection)
            .unwrap();
    }
    let (output, elapsed) = wait_at_most(run, Duration::from_secs(15));
    assert_eq!(output.status.code(), Some(74), "{}", text(&output.stderr));
    // The next extend is due within a third of the TTL; `sleep` dies at SIGTERM.
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    let stderr = text(&output.stderr);
    assert!(stderr.contains("was lost"), "{stderr}");
    assert!(stderr.contains("killed by SIGTERM"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A command that ignores SIGTERM (the trap notes it in `$1`, then the loop goes
/// on); `$2` names a file it touches once the trap is set.
const STUBBORN: &str = r#"trap 'echo term >> "$1"' TERM; : > "$2"; while :; do sleep 0.05; done"#;

fn marker(name: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("qlock-{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// Waits for `path` to exist: the command is running and its trap is set.
fn wait_for_file(path: &std::path::Path) {
    let started = Instant::now();
    while !path.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{path:?} never created"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_deleted_lock_kills_a_command_that_ignores_sigterm_long_before_grace() {
    let cluster = cluster();
    let urls = cluster.urls();
    let (terms, ready) = (marker("deleted-terms"), marker("deleted-ready"));
    let run = spawn_qlock(
        &urls,
        &[
            "run",
            "--key",
            "stubborn",
            "--ttl",
            "2s",
            "--grace",
            "10s",
            "--",
            "sh",
            "-c",
            STUBBORN,
            "stubborn",
            terms.to_str().unwrap(),
            ready.to_str().unwrap(),
        ],
    );
    wait_until_held(&urls, "stubborn");
    wait_for_file(&ready);
    // Behind its back: a majority forgets the key, so a successor could take it
    // at once. The next extend (within 0.7 s) is refused for certain.
    for url in &urls[..2] {
        let mut connection = redis::Client::open(url.as_str())
            .and_then(|client| client.get_connection())
            .unwrap();
        let _: i64 = redis::cmd("DEL")
            .arg("stubborn")
            .query(&mut connection)
            .unwrap();
    }
    let deleted = Instant::now();
    let (output, _) = wait_at_most(run, Duration::from_secs(20));
    let died = deleted.elapsed();
    let term_log = std::fs::read_to_string(&terms).unwrap_or_default();
    let _ = (std::fs::remove_file(&terms), std::fs::remove_file(&ready));
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(74), "{stderr}");
    // Not the 10 s of --grace: SIGKILL follows the SIGTERM within a second.
    assert!(died < Duration::from_secs(5), "took {died:?}: {stderr}");
    assert!(term_log.contains("term"), "no SIGTERM first: {stderr}");
    assert!(stderr.contains("was lost"), "{stderr}");
    assert!(stderr.contains("killed by SIGKILL"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn failing_extends_stop_the_command_within_the_validity() {
    let mut cluster = cluster();
    let urls = cluster.urls();
    let (terms, ready) = (marker("failing-terms"), marker("failing-ready"));
    let run = spawn_qlock(
        &urls,
        &[
            "run",
            "--key",
            "stranded",
            "--ttl",
            "3s",
            "--grace",
            "10s",
            "--",
            "sh",
            "-c",
            STUBBORN,
            "stubborn",
            terms.to_str().unwrap(),
            ready.to_str().unwrap(),
        ],
    );
    wait_until_held(&urls, "stranded");
    wait_for_file(&ready);
    // A majority goes silent: no extend can succeed, none is refused, and the
    // validity (under 3 s from the last extend) runs out.
    cluster.kill(1).unwrap();
    cluster.kill(2).unwrap();
    let killed = Instant::now();
    let (output, _) = wait_at_most(run, Duration::from_secs(25));
    let died = killed.elapsed();
    let term_log = std::fs::read_to_string(&terms).unwrap_or_default();
    let _ = (std::fs::remove_file(&terms), std::fs::remove_file(&ready));
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(74), "{stderr}");
    // SIGTERM came while validity was left, SIGKILL at the validity's end:
    // not the 10 s of --grace after it.
    assert!(died < Duration::from_secs(7), "took {died:?}: {stderr}");
    assert!(term_log.contains("term"), "no SIGTERM first: {stderr}");
    assert!(stderr.contains("before its validity runs out"), "{stderr}");
    assert!(stderr.contains("killed by SIGKILL"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn status_shows_the_holder_and_sigterm_releases() {
    let cluster = cluster();
    let urls = cluster.urls();
    let run = spawn_qlock(&urls, &["run", "--key", "shown", "--", "sleep", "30"]);
    wait_until_held(&urls, "shown");
    let status = qlock(&urls).args(["status", "shown"]).output().unwrap();
    let stdout = text(&status.stdout);
    assert_eq!(status.status.code(), Some(0), "{stdout}");
    // The default metadata names the qlock process that holds the lock.
    assert!(
        stdout.contains(&format!("qlock pid={} ", run.id())),
        "{stdout}"
    );
    assert!(stdout.contains("cmd=sleep"), "{stdout}");
    assert!(stdout.contains("held: 3 of 3"), "{stdout}");

    // SIGTERM to qlock: passed on to the command, the lock released, 143.
    send_signal(&run, "-TERM");
    let (output, elapsed) = wait_at_most(run, Duration::from_secs(10));
    assert_eq!(output.status.code(), Some(143), "{}", text(&output.stderr));
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    let status = qlock(&urls).args(["status", "shown"]).output().unwrap();
    assert_eq!(status.status.code(), Some(3), "{}", text(&status.stdout));
    assert!(text(&status.stdout).contains("not held"));
}

#[test]
fn health_reports_every_instance() {
    let mut cluster = cluster();
    let urls = cluster.urls();
    let output = qlock(&urls).arg("health").output().unwrap();
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("3 of 3 instance(s) reachable"), "{stdout}");
    assert_eq!(stdout.matches(" ok ").count(), 3, "{stdout}");

    cluster.kill(1).unwrap();
    cluster.kill(2).unwrap();
    let output = qlock(&urls).arg("health").output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stdout).contains("1 of 3 instance(s) reachable"));
    assert_one_line_error(&output, "only 1 of 3 instance(s) reachable");
    // `run` refuses at once rather than waiting out --wait.
    let started = Instant::now();
    let output = qlock(&urls)
        .args(["run", "--key", "k", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_one_line_error(
        &output,
        "only 1 of 3 instance(s) can vote (the others are down or quarantined), 2 needed",
    );
}

#[test]
fn bad_input_is_one_line_and_exits_2() {
    let urls = ["redis://127.0.0.1:1".to_string()];
    // A TLS option with a plain URL: a forgotten rediss://, or a qlock built
    // without TLS.
    let tls = if cfg!(feature = "tls") {
        "invalid danger_accept_invalid_certs: no instance URL uses TLS"
    } else {
        "need qlock built with the `tls` feature"
    };
    let cases: [(&[&str], &str); 6] = [
        (&["--redis", "notaurl", "status", "k"], "invalid Redis URL"),
        (&["--tls-insecure", "health"], tls),
        (&["run", "--key", "k", "--ttl", "5x", "--", "true"], "--ttl"),
        (
            &["--instance-timeout", "soon", "health"],
            "--instance-timeout",
        ),
        (&["--quorum", "3", "health"], "quorum 3 is out of range"),
        (&["run", "--", "true"], "--key"),
    ];
    for (args, message) in cases {
        let output = qlock(&urls).args(args).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert_one_line_error(&output, message);
    }
}

#[test]
fn help_documents_the_exit_codes() {
    let output = Command::new(QLOCK).arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = text(&output.stdout);
    for code in ["74", "75", "126/127", "128+N"] {
        assert!(help.contains(code), "{code} missing from:\n{help}");
    }
}

#[test]
fn bench_reports_latencies() {
    let cluster = cluster();
    let output = qlock(&cluster.urls())
        .args(["bench", "--seconds", "1", "--tasks", "2"])
        .output()
        .unwrap();
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    for column in ["attempts", "p50", "p99", "acquire+release"] {
        assert!(stdout.contains(column), "{column} missing from:\n{stdout}");
    }
}

#[test]
fn bench_with_latency_runs_a_tolerance_phase() {
    let cluster = cluster();
    let output = qlock(&cluster.urls())
        .args([
            "bench",
            "--seconds",
            "1",
            "--tasks",
            "2",
            "--latency",
            "30ms",
            "--slow",
            "1",
        ])
        .output()
        .unwrap();
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(stdout.contains("instances as they are"), "{stdout}");
    assert!(
        stdout.contains("with 30ms added to every round trip to 1 of 3 instance(s)"),
        "{stdout}"
    );
    assert!(stdout.contains("slowed / healthy"), "{stdout}");
    // A slow minority is not waited for: every attempt still succeeds.
    assert!(stdout.contains("success 100.0%"), "{stdout}");
}

/// What the README's `cargo run --features cli --bin qlock -- run --key demo --
/// echo hi` relies on: with no instances given, qlock starts its own.
#[test]
fn without_instances_qlock_starts_local_servers() {
    let mut command = Command::new(QLOCK);
    command
        .env_remove("QLOCK_REDIS_URLS")
        .env_remove("QLOCK_KEY_PREFIX")
        .timeout(INVOCATION_TIMEOUT)
        .args(["run", "--key", "demo", "--", "echo", "hi"]);
    for var in TLS_VARS {
        command.env_remove(var);
    }
    let output = command.output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "hi\n");
    assert!(text(&output.stderr).contains("started 3 local redis-server"));
}

/// Connections each instance has accepted so far, read on `connections`, one
/// per instance opened beforehand (so the reading adds none).
fn connections_received(connections: &mut [redis::Connection]) -> Vec<u64> {
    connections
        .iter_mut()
        .map(|connection| {
            let info: String = redis::cmd("INFO")
                .arg("stats")
                .query(connection)
                .expect("INFO");
            info.lines()
                .find_map(|line| line.strip_prefix("total_connections_received:"))
                .and_then(|count| count.trim().parse().ok())
                .unwrap_or_else(|| panic!("no total_connections_received in {info}"))
        })
        .collect()
}

/// `run`'s options are checked before anything starts or connects: a usage
/// error (2) in one line, whether the instances are up (and then none of them
/// is even connected to), down, or not given at all (no local servers started).
#[test]
fn run_options_are_checked_before_anything_connects() {
    let cluster = cluster();
    let urls = cluster.urls();
    let mut connections: Vec<redis::Connection> = urls
        .iter()
        .map(|url| {
            redis::Client::open(url.as_str())
                .and_then(|client| client.get_connection())
                .expect("connect")
        })
        .collect();
    let long_metadata = "m".repeat(quorumlock::MAX_METADATA_LEN + 1);
    let cases: [(&[&str], &str); 8] = [
        (&["--key", ""], "--key \"\": the lock key is empty"),
        // Takes the lock, then could not keep it: found only after acquiring
        // before the check.
        (&["--key", "k", "--ttl", "3ms"], "--ttl 3ms is too short"),
        (&["--key", "k", "--ttl", "0s"], "--ttl 0s"),
        (&["--key", "k:fence"], "reserved"),
        (&["--key", "k", "--metadata", &long_metadata], "--metadata"),
        (&["--key", "k", "--wait", "1000000years"], "--wait"),
        (&["--key", "k", "--grace", "1000000years"], "--grace"),
        // No TTL leaves room for the watchdog with this much drift.
        (
            &["--drift-factor", "0.4", "--key", "k"],
            "(with --drift-factor 0.4)",
        ),
    ];
    let down = ["redis://127.0.0.1:1".to_string()];
    let before = connections_received(&mut connections);
    for (options, message) in cases {
        let args: Vec<&str> = ["run"]
            .iter()
            .chain(options)
            .chain(&["--", "echo", "ran"])
            .copied()
            .collect();
        // Down first: before the check, these failed to connect (exit 1).
        for instances in [&down[..], &urls[..]] {
            let output = qlock(instances).args(&args).output().unwrap();
            assert_eq!(output.status.code(), Some(2), "{args:?} on {instances:?}");
            assert_one_line_error(&output, message);
            assert_eq!(text(&output.stdout), "", "{args:?}");
        }
    }
    assert_eq!(
        connections_received(&mut connections),
        before,
        "qlock connected"
    );
    // The count does see qlock's connections: a run that is not refused opens one.
    qlock(&urls)
        .args(["run", "--key", "k", "--", "true"])
        .assert()
        .code(0);
    let after = connections_received(&mut connections);
    assert!(
        after
            .iter()
            .zip(&before)
            .all(|(after, before)| after > before),
        "{before:?} then {after:?}"
    );
    // Without instances: no local servers started first (their notice would be
    // a second line).
    let mut command = Command::new(QLOCK);
    command
        .env_remove("QLOCK_REDIS_URLS")
        .env_remove("QLOCK_KEY_PREFIX")
        .timeout(INVOCATION_TIMEOUT)
        .args(["run", "--key", "", "--", "echo", "ran"]);
    for var in TLS_VARS {
        command.env_remove(var);
    }
    let output = command.output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert_one_line_error(&output, "the lock key is empty");
}

/// qlock's stderr, line by line as it comes.
#[cfg(target_os = "linux")]
fn stderr_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("piped stderr");
    let (send, receive) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if send.send(line).is_err() {
                break;
            }
        }
    });
    receive
}

/// Reads `run`'s stderr until a line contains `wanted`, and returns the lines
/// read, that one last; after `limit`, kills `run` and panics.
#[cfg(target_os = "linux")]
fn line_with(
    run: &mut Child,
    lines: &std::sync::mpsc::Receiver<String>,
    wanted: &str,
    limit: Duration,
) -> Vec<String> {
    let started = Instant::now();
    let mut seen = Vec::new();
    loop {
        let left = limit.saturating_sub(started.elapsed());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let found = line.contains(wanted);
                seen.push(line);
                if found {
                    return seen;
                }
            }
            Err(_) => {
                let _ = run.kill();
                let _ = run.wait();
                panic!("no {wanted:?} within {limit:?} in stderr: {seen:?}");
            }
        }
    }
}

/// A stopped CMD is reported once, keeps the lock (it may be continued), and
/// a signal to qlock still ends it: SIGTERM, and SIGCONT so that its handler
/// runs now rather than SIGKILL after --grace. (Stops are seen on Linux.)
#[cfg(target_os = "linux")]
#[test]
fn a_stopped_command_is_reported_once_and_still_stopped_on_sigterm() {
    let cluster = cluster();
    let urls = cluster.urls();
    let mut run = spawn_qlock(
        &urls,
        &[
            "run",
            "--key",
            "stopped",
            "--ttl",
            "3s",
            "--grace",
            "20s",
            "--",
            "sh",
            "-c",
            r#"trap 'echo term; exit 3' TERM; kill -STOP $$; echo continued"#,
        ],
    );
    let lines = stderr_lines(&mut run);
    let seen = line_with(&mut run, &lines, "CMD is stopped", Duration::from_secs(10));
    let notice = seen.last().unwrap();
    assert!(
        notice.starts_with("qlock: CMD is stopped (SIGSTOP)"),
        "{seen:?}"
    );
    assert!(notice.contains("keeps the lock"), "{notice}");
    // Extends go on (every second) while it is stopped, and nothing more is said.
    thread::sleep(Duration::from_millis(2_200));
    let held = values(&urls, "stopped").iter().flatten().count();
    assert!(held >= 2, "the lock lapsed while CMD was stopped");
    send_signal(&run, "-TERM");
    let (output, elapsed) = wait_at_most(run, Duration::from_secs(15));
    let rest: Vec<String> = lines.try_iter().collect();
    assert_eq!(output.status.code(), Some(143), "{rest:?}");
    // Not the 20 s of --grace: the trap ran at once.
    assert!(
        elapsed < Duration::from_secs(5),
        "took {elapsed:?}: {rest:?}"
    );
    assert_eq!(text(&output.stdout), "term\n", "{rest:?}");
    assert!(
        !rest.iter().any(|line| line.contains("CMD is stopped")),
        "said twice: {rest:?}"
    );
}

/// A pseudo-terminal: the master end, and the slave's path.
#[cfg(target_os = "linux")]
fn pseudo_terminal() -> (std::fs::File, std::ffi::CString) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    // Close-on-exec, as std opens every file: only qlock gets the slave end.
    let master = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/ptmx")
        .expect("open /dev/ptmx (no pseudo-terminals here?)");
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: plain calls on an open descriptor; ptsname_r writes at most
    // `name.len()` bytes into `name`, NUL included.
    unsafe {
        assert_eq!(libc::grantpt(master.as_raw_fd()), 0, "grantpt");
        assert_eq!(libc::unlockpt(master.as_raw_fd()), 0, "unlockpt");
        assert_eq!(
            libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()),
            0,
            "ptsname_r"
        );
    }
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
    let slave = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_owned();
    (master, slave)
}

/// qlock in the foreground of a real terminal, as typed at a shell prompt: a
/// CMD that reads it is stopped by the kernel (SIGTTIN), and qlock says why.
#[cfg(target_os = "linux")]
#[test]
fn a_command_that_reads_the_terminal_is_reported() {
    use std::os::unix::process::CommandExt;
    let cluster = cluster();
    let urls = cluster.urls();
    let (master, slave) = pseudo_terminal();
    let mut command = StdCommand::new(QLOCK);
    command
        .args([
            "run",
            "--key",
            "terminal",
            "--",
            "sh",
            "-c",
            r#"read line; echo "read $line""#,
        ])
        .env("QLOCK_REDIS_URLS", urls.join(","))
        .env_remove("QLOCK_KEY_PREFIX")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in TLS_VARS {
        command.env_remove(var);
    }
    // SAFETY: between fork and exec, only async-signal-safe calls (setsid,
    // open, ioctl, dup2, close) on a path made before the fork; no allocation.
    unsafe {
        command.pre_exec(move || {
            // A session of its own, the terminal its controlling one and its
            // stdin: qlock's process group is the terminal's foreground group.
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::open(slave.as_ptr(), libc::O_RDWR);
            if fd < 0 || libc::ioctl(fd, libc::TIOCSCTTY, 0) < 0 || libc::dup2(fd, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if fd > 2 {
                libc::close(fd);
            }
            Ok(())
        });
    }
    let mut run = command.spawn().expect("spawn qlock");
    let lines = stderr_lines(&mut run);
    let seen = line_with(&mut run, &lines, "CMD is stopped", Duration::from_secs(10));
    let notice = seen.last().unwrap();
    assert!(
        notice.starts_with("qlock: CMD is stopped (SIGTTIN): it tried to read the terminal"),
        "{seen:?}"
    );
    assert!(notice.contains("</dev/null"), "{notice}");
    send_signal(&run, "-TERM");
    let (output, _) = wait_at_most(run, Duration::from_secs(15));
    let rest: Vec<String> = lines.try_iter().collect();
    assert_eq!(output.status.code(), Some(143), "{rest:?}");
    assert_eq!(text(&output.stdout), "", "CMD read the terminal");
    drop(master);
}

/// CMD's environment is qlock's without QLOCK_REDIS_URLS (its URLs may hold
/// passwords) unless --keep-env; qlock's other variables are no secret.
#[test]
fn the_command_does_not_inherit_the_redis_urls() {
    let cluster = cluster();
    let urls = cluster.urls();
    let show = r#"echo "urls=[$QLOCK_REDIS_URLS] prefix=[$QLOCK_KEY_PREFIX]""#;
    qlock(&urls)
        .env("QLOCK_KEY_PREFIX", "env-test:")
        .args(["run", "--key", "env", "--", "sh", "-c", show])
        .assert()
        .code(0)
        .stdout("urls=[] prefix=[env-test:]\n");
    qlock(&urls)
        .env("QLOCK_KEY_PREFIX", "env-test:")
        .args(["run", "--key", "env", "--keep-env", "--", "sh", "-c", show])
        .assert()
        .code(0)
        .stdout(format!("urls=[{}] prefix=[env-test:]\n", urls.join(",")));
}

/// State and start time of process `pid`, from /proc (`None` once it is gone).
#[cfg(target_os = "linux")]
fn process(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command's name, which may hold spaces and parentheses.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // starttime is field 22 of the whole line, the 20th after the name.
    let started = fields.get(19)?.parse().ok()?;
    Some((state, started))
}

/// SIGKILL to qlock, which nothing can catch: CMD dies with it (the kernel sends
/// it SIGKILL), rather than run on without anyone extending the lock.
#[cfg(target_os = "linux")]
#[test]
fn a_command_dies_with_qlock() {
    let cluster = cluster();
    let urls = cluster.urls();
    let pid_file = marker("orphan-pid");
    let mut run = spawn_qlock(
        &urls,
        &[
            "run",
            "--key",
            "orphan",
            "--",
            "sh",
            "-c",
            r#"echo $$ > "$1.tmp" && mv "$1.tmp" "$1" && exec sleep 30"#,
            "sh",
            pid_file.to_str().unwrap(),
        ],
    );
    wait_until_held(&urls, "orphan");
    wait_for_file(&pid_file);
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _ = std::fs::remove_file(&pid_file);
    let (_, started) = process(pid).expect("CMD is running");
    run.kill().expect("SIGKILL qlock");
    run.wait().unwrap();
    // Alive: there, not a zombie (its new parent may be slow to reap it), and
    // not a new process under a reused pid.
    let alive = || matches!(process(pid), Some((state, at)) if at == started && !matches!(state, 'Z' | 'X'));
    let killed = Instant::now();
    while alive() && killed.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(20));
    }
    if alive() {
        // SAFETY: kill(2) on the pid checked above.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
        panic!("CMD (pid {pid}) still running 5s after qlock was killed");
    }
}

#[test]
fn max_hold_stops_a_command_that_hangs_and_exits_124() {
    let cluster = cluster();
    let urls = cluster.urls();
    let run = spawn_qlock(
        &urls,
        &[
            "run",
            "--key",
            "hangs",
            "--ttl",
            "3s",
            "--max-hold",
            "600ms",
            "--grace",
            "1s",
            "--",
            "sleep",
            "30",
        ],
    );
    let (output, took) = wait_at_most(run, Duration::from_secs(20));
    assert_eq!(output.status.code(), Some(124), "{}", text(&output.stderr));
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(
        text(&output.stderr).contains("--max-hold"),
        "{}",
        text(&output.stderr)
    );
    // Released on the way out.
    assert_eq!(values(&urls, "hangs"), vec![None, None, None]);
}
