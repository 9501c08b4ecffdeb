//! The fault proxy in front of real redis-servers: it forwards faithfully, and each
//! fault (latency, black hole, partition, reset, drop) is what a client observes.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use quorumlock::testing::{Direction, FaultProxy, RedisCluster, RedisServer};
use quorumlock::{Error, QuorumLocker, Vote};
use redis::aio::MultiplexedConnection;
use redis::{AsyncCommands, AsyncConnectionConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{sleep, timeout, Instant};

/// Every test finishes well within this, or fails instead of hanging.
const BOUND: Duration = Duration::from_secs(20);
/// How long "does not complete" is watched for.
const WATCH: Duration = Duration::from_millis(200);
const TTL: Duration = Duration::from_secs(30);
const SHORT_TTL: Duration = Duration::from_secs(1);
const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

async fn bounded<T>(test: impl Future<Output = T>) -> T {
    timeout(BOUND, test)
        .await
        .expect("test exceeded its time bound")
}

fn server() -> RedisServer {
    RedisServer::start().expect("start redis-server")
}

async fn proxy(upstream: &RedisServer) -> FaultProxy {
    FaultProxy::start(upstream.addr())
        .await
        .expect("start proxy")
}

/// A connection through `proxy` without redis-rs's response timeout, so only the
/// proxy decides when (and whether) replies arrive.
async fn connect(proxy: &FaultProxy) -> MultiplexedConnection {
    let config = AsyncConnectionConfig::new().set_response_timeout(None);
    redis::Client::open(proxy.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("connect through the proxy")
}

async fn ping(connection: &mut MultiplexedConnection) -> redis::RedisResult<String> {
    redis::cmd("PING").query_async(connection).await
}

/// Waits (bounded) until `condition` holds, checking every few milliseconds.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        sleep(Duration::from_millis(5)).await;
    }
}

/// Three servers, a proxy in front of each, and a locker that knows only the proxies.
async fn proxied_locker(
    instance_timeout: Duration,
) -> (RedisCluster, Vec<FaultProxy>, QuorumLocker) {
    let cluster = RedisCluster::start(3).expect("start redis-servers");
    let mut proxies = Vec::new();
    for server in cluster.servers() {
        proxies.push(proxy(server).await);
    }
    let locker = QuorumLocker::builder()
        .urls(proxies.iter().map(FaultProxy::url))
        .instance_timeout(instance_timeout)
        .default_wait(Duration::from_secs(5))
        .build()
        .await
        .expect("build locker");
    // Every instance identified and measured before the tests' faults begin.
    locker.prepare().await.expect("prepare");
    (cluster, proxies, locker)
}

/// Which servers hold `key` for the lock with `token`, read directly (not through the proxies).
async fn holders(cluster: &RedisCluster, key: &str, token: &str) -> Vec<usize> {
    let mut on = Vec::new();
    for i in 0..cluster.len() {
        let mut direct = cluster.connection(i).await.expect("direct connection");
        let value: Option<String> = direct.get(key).await.expect("GET");
        // The value starts with the token; anything after a space is the lock's own.
        let ours = value.is_some_and(|value| {
            value
                .strip_prefix(token)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
        });
        if ours {
            on.push(i);
        }
    }
    on
}

#[tokio::test]
async fn passes_commands_and_locks_through() {
    bounded(async {
        let server = server();
        let proxy = proxy(&server).await;
        assert_eq!(proxy.upstream(), server.addr());
        assert_eq!(proxy.url(), format!("redis://127.0.0.1:{}", proxy.port()));
        assert_ne!(proxy.port(), server.port());

        let mut connection = connect(&proxy).await;
        assert_eq!(ping(&mut connection).await.unwrap(), "PONG");
        let _: () = connection.set("greeting", "hello").await.unwrap();
        let value: String = connection.get("greeting").await.unwrap();
        assert_eq!(value, "hello");
        assert_eq!(proxy.connections(), 1);
        assert!(proxy.bytes_forwarded(Direction::ToServer) > 0);
        assert!(proxy.bytes_forwarded(Direction::ToClient) > 0);
        assert_eq!(
            proxy.bytes_forwarded(Direction::Both),
            proxy.bytes_forwarded(Direction::ToServer) + proxy.bytes_forwarded(Direction::ToClient)
        );

        // A large value crosses in many chunks and comes back intact.
        let big: String = (0..200_000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let _: () = connection.set("big", &big).await.unwrap();
        let back: String = connection.get("big").await.unwrap();
        assert!(back == big, "large value corrupted");

        let (cluster, _proxies, locker) = proxied_locker(Duration::from_secs(2)).await;
        let lock = locker
            .acquire("job", TTL)
            .await
            .expect("acquire via proxies");
        // The attempt returns at the quorum; the third grant may still be on its way.
        locker.settle().await;
        assert_eq!(holders(&cluster, "job", lock.token()).await, [0, 1, 2]);
        let token = lock.token().to_string();
        let released = lock.release().await.expect("release via proxies");
        assert!(released >= 2, "released on {released}");
        locker.settle().await;
        assert!(holders(&cluster, "job", &token).await.is_empty());
    })
    .await;
}

#[tokio::test]
async fn latency_delays_each_way_and_keeps_order() {
    bounded(async {
        let server = server();
        let proxy = proxy(&server).await;
        let mut connection = connect(&proxy).await;
        ping(&mut connection).await.unwrap();

        proxy.set_latency(Direction::ToServer, Duration::from_millis(30));
        let started = Instant::now();
        assert_eq!(ping(&mut connection).await.unwrap(), "PONG");
        let round_trip = started.elapsed();
        assert!(round_trip >= Duration::from_millis(30), "{round_trip:?}");

        proxy.set_latency(Direction::Both, Duration::from_millis(20));
        let started = Instant::now();
        ping(&mut connection).await.unwrap();
        let round_trip = started.elapsed();
        assert!(round_trip >= Duration::from_millis(40), "{round_trip:?}");

        // Jitter on many pipelined commands: any reordering of bytes would corrupt the
        // RESP stream or mismatch replies with requests.
        proxy.set_latency(Direction::Both, Duration::ZERO);
        proxy.set_jitter(Direction::Both, Duration::from_millis(5));
        let increments = (0..50).map(|_| {
            let mut connection = connection.clone();
            async move { connection.incr::<_, _, i64>("counter", 1).await }
        });
        let mut replies: Vec<i64> = futures_util::future::try_join_all(increments)
            .await
            .expect("INCR under jitter");
        replies.sort_unstable();
        assert_eq!(
            replies,
            (1..=50).collect::<Vec<_>>(),
            "replies lost or mixed up"
        );
        let total: i64 = connection.get("counter").await.unwrap();
        assert_eq!(total, 50);

        proxy.set_jitter(Direction::Both, Duration::ZERO);
        assert_eq!(ping(&mut connection).await.unwrap(), "PONG");
    })
    .await;
}

#[tokio::test]
async fn blackhole_swallows_commands_and_costs_votes() {
    bounded(async {
        let server = server();
        let proxy = proxy(&server).await;
        let mut connection = connect(&proxy).await;
        ping(&mut connection).await.unwrap();
        let sent = proxy.bytes_forwarded(Direction::ToServer);

        proxy.blackhole(true);
        let waited = timeout(Duration::from_millis(300), ping(&mut connection)).await;
        assert!(waited.is_err(), "answered from a black hole: {waited:?}");
        assert_eq!(proxy.bytes_forwarded(Direction::ToServer), sent);
        assert_eq!(proxy.connections(), 1, "a black hole does not close");

        // The PING was lost, so lifting the black hole resets this connection...
        proxy.blackhole(false);
        let after = timeout(Duration::from_secs(2), ping(&mut connection))
            .await
            .expect("a reset, not silence");
        assert!(after.is_err(), "a connection that lost bytes survived");
        eventually("the corrupt connection closes", || proxy.connections() == 0).await;
        // ...and new ones work.
        let mut fresh = connect(&proxy).await;
        assert_eq!(ping(&mut fresh).await.unwrap(), "PONG");

        let (cluster, proxies, locker) = proxied_locker(Duration::from_millis(300)).await;
        proxies[0].blackhole(true);
        // Background work aimed at a black hole gives up once the keys would have
        // expired: a short TTL keeps `settle` short.
        let lock = locker
            .acquire("job", SHORT_TTL)
            .await
            .expect("two of three is a quorum");
        assert_eq!(holders(&cluster, "job", lock.token()).await, [1, 2]);
        lock.release().await.expect("release on the reachable two");

        proxies[1].blackhole(true);
        let err = locker.try_acquire("other", SHORT_TTL).await.unwrap_err();
        assert!(matches!(err, Error::NotAcquired { .. }), "{err}");
        assert_eq!(err.unreachable_instances(), 2, "{err}");
        for i in [0, 1] {
            let vote = &err.causes()[i].vote;
            assert!(matches!(vote, Vote::TimedOut(_)), "instance {i}: {vote:?}");
        }
        assert!(matches!(err.causes()[2].vote, Vote::Granted), "{err}");
        timeout(Duration::from_secs(5), locker.settle())
            .await
            .expect("settle");
        // The lost attempt's grant was rolled back; the black holes never saw the SET.
        let mut direct = cluster.connection(2).await.unwrap();
        let left: Option<String> = direct.get("other").await.unwrap();
        assert_eq!(left, None);
    })
    .await;
}

#[tokio::test]
async fn cut_holds_bytes_until_heal() {
    bounded(async {
        let server = server();
        let proxy = proxy(&server).await;
        let mut connection = connect(&proxy).await;
        ping(&mut connection).await.unwrap();
        let mut direct = redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let clients = |list: String| list.lines().count();
        let before = clients(
            redis::cmd("CLIENT")
                .arg("LIST")
                .query_async(&mut direct)
                .await
                .unwrap(),
        );

        proxy.cut();
        let sent = proxy.bytes_forwarded(Direction::ToServer);
        let mut command = connection.clone();
        let incr = command.incr::<_, _, i64>("counter", 5);
        tokio::pin!(incr);
        assert!(
            timeout(WATCH, &mut incr).await.is_err(),
            "completed across a cut"
        );
        assert_eq!(proxy.bytes_forwarded(Direction::ToServer), sent);
        let counter: Option<i64> = direct.get("counter").await.unwrap();
        assert_eq!(counter, None, "the server saw the command during the cut");

        // A new connection is accepted but not connected upstream meanwhile.
        let mut raw = TcpStream::connect(proxy.addr()).await.expect("accepted");
        raw.write_all(PING).await.unwrap();
        let mut reply = [0; 7];
        assert!(timeout(WATCH, raw.read_exact(&mut reply)).await.is_err());
        let during = clients(
            redis::cmd("CLIENT")
                .arg("LIST")
                .query_async(&mut direct)
                .await
                .unwrap(),
        );
        assert_eq!(during, before, "connected upstream during the cut");
        assert_eq!(proxy.connections(), 2);

        proxy.heal();
        assert_eq!(incr.await.expect("delivered after heal"), 5);
        raw.read_exact(&mut reply).await.expect("PONG after heal");
        assert_eq!(&reply, b"+PONG\r\n");
        assert_eq!(ping(&mut connection).await.unwrap(), "PONG");
    })
    .await;
}

#[tokio::test]
async fn reset_all_breaks_open_connections_only() {
    bounded(async {
        let server = server();
        let proxy = proxy(&server).await;
        let mut connection = connect(&proxy).await;
        ping(&mut connection).await.unwrap();
        let mut raw = TcpStream::connect(proxy.addr()).await.unwrap();
        raw.write_all(PING).await.unwrap();
        let mut reply = [0; 7];
        raw.read_exact(&mut reply).await.unwrap();

        // A command held in flight by latency when the reset comes.
        proxy.set_latency(Direction::ToServer, Duration::from_millis(100));
        let mut in_flight = connection.clone();
        let pending = tokio::spawn(async move { ping(&mut in_flight).await });
        sleep(Duration::from_millis(20)).await;
        proxy.reset_all();
        proxy.set_latency(Direction::ToServer, Duration::ZERO);

        let err = pending
            .await
            .unwrap()
            .expect_err("in-flight command survived a reset");
        assert!(err.is_io_error() || err.is_connection_dropped(), "{err:?}");
        let err = ping(&mut connection)
            .await
            .expect_err("next command on a reset connection");
        assert!(err.is_io_error() || err.is_connection_dropped(), "{err:?}");
        // A reset, not a normal close.
        let mut byte = [0; 1];
        match raw.read(&mut byte).await {
            Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}"),
            Ok(n) => panic!("read {n} bytes instead of a reset"),
        }
        eventually("reset connections close", || proxy.connections() == 0).await;

        let mut fresh = connect(&proxy).await;
        assert_eq!(ping(&mut fresh).await.unwrap(), "PONG");
        assert_eq!(proxy.connections(), 1);
    })
    .await;
}

#[tokio::test]
async fn dropping_the_proxy_closes_its_port_and_connections() {
    bounded(async {
        let server = server();
        let proxy = proxy(&server).await;
        let addr = proxy.addr();
        let mut raw = TcpStream::connect(addr).await.unwrap();
        raw.write_all(PING).await.unwrap();
        let mut reply = [0; 7];
        raw.read_exact(&mut reply).await.unwrap();

        drop(proxy);
        // Blocking, without yielding to the runtime: the port is closed by `drop`
        // itself, not later by a task.
        let refused = std::net::TcpStream::connect(addr);
        assert!(refused.is_err(), "port still accepts after drop");
        let mut byte = [0; 1];
        let closed = timeout(Duration::from_secs(2), raw.read(&mut byte))
            .await
            .expect("the proxied connection is closed");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    })
    .await;
}

#[tokio::test]
async fn upstream_down_resets_the_client() {
    bounded(async {
        let mut server = server();
        let proxy = proxy(&server).await;
        server.kill().unwrap();
        let mut raw = TcpStream::connect(proxy.addr())
            .await
            .expect("the proxy accepts");
        let mut byte = [0; 1];
        let result = timeout(Duration::from_secs(2), async {
            raw.write_all(PING).await?;
            raw.read(&mut byte).await
        })
        .await
        .expect("closed, not silent");
        assert!(result.is_err(), "{result:?}");
        eventually("the connection closes", || proxy.connections() == 0).await;
    })
    .await;
}

/// TCP_NODELAY on the locker's connections: through proxies adding 10 ms each
/// way, 8 tasks acquiring and releasing at once on one locker each take about
/// one round trip per operation, as one task alone does. With Nagle's algorithm
/// a command waits for the previous one's acknowledgement on the same
/// multiplexed connection, and most concurrent operations took two round trips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_operations_each_take_one_round_trip() {
    bounded(async {
        let (_cluster, proxies, locker) = proxied_locker(Duration::from_millis(200)).await;
        for proxy in &proxies {
            proxy.set_latency(Direction::Both, Duration::from_millis(10));
        }
        let cycle = |locker: QuorumLocker, key: String| async move {
            let started = Instant::now();
            let lock = locker.acquire(&key, TTL).await.expect("acquire");
            let acquired = started.elapsed();
            let started = Instant::now();
            lock.release().await.expect("release");
            (acquired, started.elapsed())
        };
        let mut alone = Vec::new();
        for i in 0..10 {
            let (acquire, release) = cycle(locker.clone(), format!("alone-{i}")).await;
            alone.extend([acquire, release]);
        }
        let mut together = Vec::new();
        for round in 0..5 {
            let tasks: Vec<_> = (0..8)
                .map(|task| tokio::spawn(cycle(locker.clone(), format!("together-{round}-{task}"))))
                .collect();
            for task in tasks {
                let (acquire, release) = task.await.expect("task");
                together.extend([acquire, release]);
            }
        }
        let median = |mut values: Vec<Duration>| {
            values.sort_unstable();
            values[values.len() / 2]
        };
        let (alone, together) = (median(alone), median(together));
        assert!(
            together < alone.mul_f64(1.5),
            "8 at once: p50 {together:?} per operation; alone: {alone:?}"
        );
    })
    .await;
}

/// The scripts are loaded by the monitor at first contact (and after every
/// restart), so the first grant and the first extend on fresh servers over a
/// 20 ms round trip do not pay `NOSCRIPT` + `SCRIPT LOAD` + retry, three round
/// trips past the 50 ms instance timeout (the second review's find: both
/// failed, and the failed extend lost the lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_grant_and_extend_over_a_slow_link_find_their_scripts() {
    bounded(async {
        let cluster = RedisCluster::start(3).expect("start redis-servers");
        let mut proxies = Vec::new();
        for server in cluster.servers() {
            let proxy = proxy(server).await;
            proxy.set_latency(Direction::Both, Duration::from_millis(10));
            proxies.push(proxy);
        }
        let locker = QuorumLocker::builder()
            .urls(proxies.iter().map(FaultProxy::url))
            .build()
            .await
            .expect("build locker");
        let lock = locker
            .try_acquire("job", TTL)
            .await
            .expect("the first attempt, with defaults");
        lock.extend(TTL).await.expect("the first extend");
        lock.release().await.expect("release");
    })
    .await;
}

/// An echo server on a free loopback port: every byte it reads goes straight back.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = [0; 64];
                while let Ok(n @ 1..) = stream.read(&mut buf).await {
                    if stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// `samples` round trips of one byte through `proxy` to an echo server, sorted,
/// each timed on `std`'s clock (the real one, even when Tokio's is paused).
async fn echo_round_trips(proxy: &FaultProxy, samples: usize) -> Vec<Duration> {
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let mut byte = [0; 1];
    let mut round_trips = Vec::with_capacity(samples);
    for i in 0..samples {
        let started = std::time::Instant::now();
        stream.write_all(&[i as u8]).await.unwrap();
        stream.read_exact(&mut byte).await.unwrap();
        round_trips.push(started.elapsed());
        assert_eq!(byte[0], i as u8, "echo out of order");
    }
    round_trips.sort_unstable();
    round_trips
}

/// Sub-millisecond latency is honoured, not rounded up to Tokio's 1 ms timer
/// ticks: with 250 µs each way (a LAN), the median round trip to an echo
/// server is 0.5 ms and some tens of µs, where the tick-rounded timer gave
/// well over 2 ms. The upper bound is generous (a loaded 2-core machine): it
/// is about granularity, not speed.
#[tokio::test]
async fn sub_millisecond_latency_is_precise() {
    bounded(async {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        proxy.set_latency(Direction::Both, Duration::from_micros(250));
        echo_round_trips(&proxy, 20).await; // connected and warm
        let round_trips = echo_round_trips(&proxy, 400).await;
        let at = |q: f64| round_trips[((round_trips.len() - 1) as f64 * q) as usize];
        let (p10, median, p90) = (at(0.1), at(0.5), at(0.9));
        println!("round trips with 250 µs each way: p10 {p10:?}, p50 {median:?}, p90 {p90:?}");
        assert!(
            round_trips[0] >= Duration::from_micros(500),
            "{:?}",
            round_trips[0]
        );
        assert!(
            median < Duration::from_micros(1500),
            "p50 {median:?}, p90 {p90:?}"
        );
    })
    .await;
}

/// Under Tokio's paused clock the latency is virtual time, as Tokio's timers
/// are: 4 s each way cost a round trip of 8 s on Tokio's clock and, auto-advanced,
/// almost nothing on the real one.
#[tokio::test(start_paused = true)]
async fn latency_under_paused_time_is_virtual() {
    bounded(async {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        proxy.set_latency(Direction::Both, Duration::from_secs(4));
        let started = Instant::now();
        let real = echo_round_trips(&proxy, 1).await[0];
        let virtual_time = started.elapsed();
        assert!(virtual_time >= Duration::from_secs(8), "{virtual_time:?}");
        assert!(
            real < Duration::from_secs(4),
            "waited in real time: {real:?}"
        );
    })
    .await;
}
