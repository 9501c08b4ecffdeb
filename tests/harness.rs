//! Tests of the `testing` fixture itself: real redis-server processes and their faults.

use std::collections::HashSet;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use quorumlock::testing::{HarnessError, RedisCluster, RedisServer};

const SHORT: Duration = Duration::from_millis(200);
const LONG: Duration = Duration::from_secs(2);

/// A raw RESP `PING` with its own timeouts, independent of the fixture's readiness check.
fn ping(addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(b"*1\r\n$4\r\nPING\r\n")?;
    let mut reply = Vec::new();
    let mut chunk = [0; 64];
    while !reply.ends_with(b"\r\n") && reply.len() < 256 {
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            break;
        }
        reply.extend_from_slice(&chunk[..read]);
    }
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

fn assert_pong(server: &RedisServer) {
    let reply = ping(server.addr(), LONG)
        .unwrap_or_else(|e| panic!("PING to {} failed: {e}", server.url()));
    assert_eq!(reply, "+PONG\r\n", "reply from {}", server.url());
}

/// Whether `pid` is a live (not zombie) redis-server.
fn is_live_redis(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself contain spaces.
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    state != Some('Z') && String::from_utf8_lossy(&cmdline).contains("redis-server")
}

/// Polls until `pid` is no longer a live redis-server; bounded.
fn wait_gone(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_live_redis(pid) {
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
    true
}

#[test]
fn servers_answer_ping_on_distinct_ports_never_6379() {
    let cluster = RedisCluster::start(3).expect("start cluster");
    assert_eq!(cluster.len(), 3);
    let ports: HashSet<u16> = cluster.servers().iter().map(RedisServer::port).collect();
    assert_eq!(ports.len(), 3, "ports must be distinct: {ports:?}");
    assert!(!ports.contains(&6379));
    for server in cluster.servers() {
        assert_pong(server);
        assert_eq!(server.url(), format!("redis://127.0.0.1:{}", server.port()));
        assert!(server.is_running());
        assert!(server.pid().is_some_and(is_live_redis));
    }
    assert_eq!(
        cluster.urls(),
        cluster
            .servers()
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
    );
}

#[test]
fn five_servers_start_quickly() {
    let started = Instant::now();
    let cluster = RedisCluster::start(5).expect("start cluster");
    let elapsed = started.elapsed();
    assert_eq!(cluster.len(), 5);
    // The brief's budget is < 1 s; allow slack for a loaded CI machine.
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
}

#[test]
fn kill_refuses_connections_and_spares_the_others() {
    let mut cluster = RedisCluster::start(3).expect("start cluster");
    let pid = cluster.server(1).pid().expect("pid");
    cluster.kill(1).expect("kill");

    let refused = TcpStream::connect_timeout(&cluster.server(1).addr(), LONG)
        .expect_err("a killed server's port must refuse connections");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);
    assert!(!cluster.server(1).is_running());
    assert_eq!(cluster.server(1).pid(), None);
    assert!(!is_live_redis(pid), "killed server must be reaped");
    assert_pong(cluster.server(0));
    assert_pong(cluster.server(2));

    cluster.kill(1).expect("killing again is a no-op");
    assert!(matches!(
        cluster.pause(1),
        Err(HarnessError::NotRunning { .. })
    ));
}

#[tokio::test]
async fn a_server_that_exits_by_itself_is_not_running() {
    let mut server = RedisServer::start().expect("start");
    let client = redis::Client::open(server.url()).expect("client");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    // The server exits without answering, so the command itself fails.
    let _ = redis::cmd("SHUTDOWN")
        .arg("NOSAVE")
        .query_async::<()>(&mut connection)
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.is_running() {
        assert!(Instant::now() < deadline, "exit not noticed");
        thread::sleep(Duration::from_millis(10));
    }
    server.restart_empty().expect("restart after exit");
    assert!(server.is_running());
    assert_pong(&server);
}

#[test]
fn pause_silences_the_server_until_resume() {
    let mut cluster = RedisCluster::start(3).expect("start cluster");
    cluster.pause(0).expect("pause");
    assert!(cluster.server(0).is_paused());
    assert!(cluster.server(0).is_running(), "paused is still running");

    let error = ping(cluster.server(0).addr(), SHORT).expect_err("a paused server must not answer");
    assert!(
        matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "expected a read timeout, got {error:?}"
    );
    assert_pong(cluster.server(1));

    cluster.resume(0).expect("resume");
    assert!(!cluster.server(0).is_paused());
    assert_pong(cluster.server(0));
}

#[tokio::test]
async fn restart_empty_comes_back_on_the_same_port_without_keys() {
    let mut cluster = RedisCluster::start(3).expect("start cluster");
    let mut connection = cluster.connection(1).await.expect("connect");
    let _: () = redis::cmd("SET")
        .arg("harness:key")
        .arg("v")
        .query_async(&mut connection)
        .await
        .expect("SET");
    assert_eq!(
        cluster.keys(1, "harness:*").await.expect("keys"),
        ["harness:key"]
    );
    assert_eq!(
        cluster.keys_everywhere("harness:*").await.expect("keys"),
        [(1, "harness:key".to_owned())]
    );

    let (port, pid) = (cluster.server(1).port(), cluster.server(1).pid());
    cluster.restart_empty(1).expect("restart");
    assert_eq!(cluster.server(1).port(), port);
    assert_ne!(cluster.server(1).pid(), pid);
    assert_pong(cluster.server(1));
    assert!(cluster.keys(1, "*").await.expect("keys").is_empty());

    // A killed server can be brought back too, and a paused one.
    cluster.kill(2).expect("kill");
    assert!(cluster.keys_everywhere("*").await.expect("keys").is_empty());
    cluster.restart_empty(2).expect("restart killed");
    cluster.pause(0).expect("pause");
    cluster.restart_empty(0).expect("restart paused");
    assert!(!cluster.server(0).is_paused());
    for server in cluster.servers() {
        assert_pong(server);
    }
}

#[tokio::test]
async fn keys_uses_scan_across_many_keys() {
    let cluster = RedisCluster::start(1).expect("start cluster");
    let mut connection = cluster.connection(0).await.expect("connect");
    let mut mset = redis::cmd("MSET");
    for i in 0..2500 {
        mset.arg(format!("many:{i}")).arg(i);
    }
    let _: () = mset.query_async(&mut connection).await.expect("MSET");
    let _: () = redis::cmd("SET")
        .arg("other")
        .arg(1)
        .query_async(&mut connection)
        .await
        .expect("SET");
    assert_eq!(cluster.keys(0, "many:*").await.expect("keys").len(), 2500);
}

#[test]
fn dropping_the_cluster_leaves_no_server_process() {
    let mut cluster = RedisCluster::start(3).expect("start cluster");
    cluster.pause(2).expect("pause"); // a stopped process must die as well
    let pids: Vec<u32> = cluster
        .servers()
        .iter()
        .filter_map(RedisServer::pid)
        .collect();
    assert_eq!(pids.len(), 3);
    assert!(pids.iter().all(|&pid| is_live_redis(pid)));
    drop(cluster);
    for pid in pids {
        // Drop reaps synchronously: no polling needed.
        assert!(
            !is_live_redis(pid),
            "redis-server {pid} outlived the cluster"
        );
    }
}

#[test]
fn a_panicking_test_leaves_no_server_process() {
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = thread::spawn(move || {
        let server = RedisServer::start().expect("start");
        tx.send(server.pid().expect("pid")).expect("send pid");
        panic!("test failure while a server runs");
    })
    .join();
    assert!(outcome.is_err());
    let pid = rx.recv().expect("pid");
    assert!(!is_live_redis(pid), "redis-server {pid} outlived the panic");
}

#[test]
fn a_server_started_on_a_finished_thread_keeps_running() {
    // The parent-death signal is tied to the spawning thread; this one exits at once.
    let server = thread::spawn(RedisServer::start)
        .join()
        .expect("thread")
        .expect("start");
    // Give a wrongly delivered SIGKILL time to land before checking.
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        assert!(server.is_running());
        thread::sleep(Duration::from_millis(20));
    }
    assert_pong(&server);
}

/// Run by `servers_die_with_a_sigkilled_test_process` as a child process.
#[test]
fn pdeathsig_helper() {
    if std::env::var_os("QUORUMLOCK_PDEATHSIG_HELPER").is_none() {
        return;
    }
    let server = RedisServer::start().expect("start");
    let dir = server.log_path().and_then(|log| log.parent()).expect("dir");
    println!("server-dir={}", dir.display());
    println!("server-pid={}", server.pid().expect("pid"));
    // Wait to be SIGKILLed by the parent test; bounded in case it never comes.
    thread::sleep(Duration::from_secs(30));
}

#[test]
fn servers_die_with_a_sigkilled_test_process() {
    use std::io::BufRead;
    let mut helper = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "pdeathsig_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("QUORUMLOCK_PDEATHSIG_HELPER", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn helper");
    let stdout = helper.stdout.take().expect("stdout");
    let mut lines = io::BufReader::new(stdout).lines().map_while(Result::ok);
    // libtest prints the test name on the same line, before our output.
    let mut value_of =
        |name: &str| lines.find_map(|line| Some(line.split_once(name)?.1.trim().to_owned()));
    let dir = value_of("server-dir=").expect("helper printed the server dir");
    let pid: u32 = value_of("server-pid=")
        .and_then(|pid| pid.parse().ok())
        .expect("helper printed the server pid");
    assert!(is_live_redis(pid));
    helper.kill().expect("SIGKILL helper");
    helper.wait().expect("reap helper");
    // The kernel delivers the parent-death signal asynchronously.
    assert!(
        wait_gone(pid),
        "redis-server {pid} outlived its SIGKILLed parent"
    );
    // No destructor ran in the helper, so its temporary directory is ours to remove.
    std::fs::remove_dir_all(dir).expect("remove the helper's server dir");
}

#[tokio::test]
async fn extra_args_and_env_apply_and_survive_restart() {
    const MARKER: &str = "quorumlock-harness-marker";
    let mut server = RedisServer::builder()
        .arg("--requirepass")
        .arg("s3cret")
        .env("LD_PRELOAD", format!("/nonexistent/{MARKER}.so"))
        .start()
        .expect("start");

    for round in ["first start", "after restart"] {
        let reply = ping(server.addr(), LONG).expect("PING");
        assert!(reply.starts_with("-NOAUTH"), "{round}: {reply:?}");

        let client = redis::Client::open(server.url()).expect("client");
        let refused = async {
            let mut connection = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
        }
        .await
        .expect_err("unauthenticated PING must fail");
        assert_eq!(refused.code(), Some("NOAUTH"), "{round}: {refused:?}");

        let url = format!("redis://:s3cret@127.0.0.1:{}", server.port());
        let client = redis::Client::open(url).expect("client");
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .expect("authenticated connection");
        let pong: String = redis::cmd("PING")
            .query_async(&mut connection)
            .await
            .expect("PING");
        assert_eq!(pong, "PONG");

        // The dynamic loader reports the bogus preload on stderr, which the log captures.
        let log = std::fs::read_to_string(server.log_path().expect("log path")).expect("log");
        assert!(
            log.contains(MARKER),
            "{round}: env not applied; log:\n{log}"
        );

        server.restart_empty().expect("restart");
    }
}

#[test]
fn a_bad_argument_reports_the_server_log() {
    let error = RedisServer::builder()
        .arg("--no-such-option")
        .arg("1")
        .start()
        .expect_err("redis-server must reject an unknown option");
    let message = error.to_string();
    assert!(matches!(error, HarnessError::NotReady { .. }), "{message}");
    assert!(message.contains("no-such-option"), "{message}");
}

/// Run by `a_missing_binary_is_an_error_that_says_what_to_install` in a child process
/// whose environment hides redis-server.
#[test]
fn missing_binary_helper() {
    let Some(expected) = std::env::var_os("QUORUMLOCK_MISSING_BINARY_HELPER") else {
        return;
    };
    let error = RedisCluster::start(2).expect_err("no redis-server can be found");
    let message = error.to_string();
    let expected = expected.to_string_lossy();
    assert!(
        message.contains(&*expected),
        "{expected:?} not in: {message}"
    );
    println!("helper-checked");
}

#[test]
fn a_missing_binary_is_an_error_that_says_what_to_install() {
    let run_helper = |bin: Option<&str>, expected: &str| {
        let mut helper = Command::new(std::env::current_exe().expect("test binary"));
        helper
            .args(["--exact", "missing_binary_helper", "--nocapture"])
            .env("QUORUMLOCK_MISSING_BINARY_HELPER", expected)
            .env("PATH", "/nonexistent");
        match bin {
            Some(bin) => helper.env("REDIS_SERVER_BIN", bin),
            None => helper.env_remove("REDIS_SERVER_BIN"),
        };
        let output = helper.output().expect("run helper");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("helper-checked"),
            "helper failed: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    // Without the `testcontainers` feature this is exactly HarnessError::NotInstalled;
    // with it, the Docker error repeats the same advice.
    run_helper(None, "apt-get install -y redis-server");
    run_helper(
        Some("/nonexistent/redis-server"),
        "could not spawn /nonexistent/redis-server",
    );
}
