//! A server's address moves to a replica that has the lockers' epoch hash
//! (replicated long ago) but not the newest lock: a failover to a lagging
//! replica. Every grant checks the server's `run_id` as well as the epoch, so
//! the promoted replica's grant is refused however the connection behaved: with
//! RESP3 the connection manager reconnects by itself at the disconnect push (no
//! request fails), and with RESP2 a `health()` call reconnects it. Found by the
//! adversarial review; before the in-script `run_id` check, both overlapped in
//! 3 runs of 3.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quorumlock::testing::RedisServer;
use quorumlock::QuorumLocker;

/// A TCP forwarder whose upstream can be switched (a virtual IP or a DNS name
/// that moves in a failover): switching drops every client connection, and
/// new ones go to the new upstream.
struct Switch {
    addr: SocketAddr,
    upstream: Arc<Mutex<SocketAddr>>,
    generation: tokio::sync::watch::Sender<u64>,
}

impl Switch {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = Arc::new(Mutex::new(upstream));
        let generation = tokio::sync::watch::Sender::new(0u64);
        let (target, killed) = (Arc::clone(&upstream), generation.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let to = *target.lock().unwrap();
                let mut killed = killed.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = killed.changed() => {}
                    }
                });
            }
        });
        Self {
            addr,
            upstream,
            generation,
        }
    }

    fn url(&self, query: &str) -> String {
        format!("redis://{}/{query}", self.addr)
    }

    fn switch(&self, to: SocketAddr) {
        *self.upstream.lock().unwrap() = to;
        self.generation.send_modify(|generation| *generation += 1);
    }
}

async fn connection(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn command(server: &RedisServer, args: &[&str]) {
    let mut connection = connection(server).await;
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    let _: redis::Value = cmd.query_async(&mut connection).await.unwrap();
}

/// Makes `replica` a copy of `primary` up to now (the epoch hash with it).
async fn replicate(replica: &RedisServer, primary: &RedisServer) {
    // Diskless sync waits 5 s by default for more replicas to join.
    command(primary, &["CONFIG", "SET", "repl-diskless-sync-delay", "0"]).await;
    let port = primary.port().to_string();
    command(replica, &["REPLICAOF", "127.0.0.1", &port]).await;
    let mut connection = connection(replica).await;
    for _ in 0..400 {
        let exists: bool = redis::cmd("EXISTS")
            .arg(quorumlock::EPOCH_KEY)
            .query_async(&mut connection)
            .await
            .unwrap();
        if exists {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the replica never got the epoch hash");
}

/// Whether a second owner got the lock while the first still held it, with
/// instance 0 failing over to a replica that stopped replicating before the
/// first lock was taken. `health` calls `health()` between the move and the
/// promotion (the replica is read-only for a moment).
async fn failover(query: &str, health: bool) -> bool {
    let s0 = RedisServer::start().unwrap();
    let r0 = RedisServer::start().unwrap();
    let s1 = RedisServer::start().unwrap();
    let s2 = RedisServer::start().unwrap();
    let vip = Switch::start(s0.addr()).await;
    let urls = |query: &str| {
        vec![
            vip.url(query),
            format!("{}/{query}", s1.url()),
            format!("{}/{query}", s2.url()),
        ]
    };
    let first = QuorumLocker::builder()
        .urls(urls(""))
        .build()
        .await
        .unwrap();
    let second = QuorumLocker::builder()
        .urls(urls(query))
        .build()
        .await
        .unwrap();
    first.prepare().await.unwrap();
    second.prepare().await.unwrap();
    replicate(&r0, &s0).await;
    if health {
        // Lagging, but still a read-only replica (of a primary that is gone).
        command(&r0, &["REPLICAOF", "127.0.0.1", "1"]).await;
    } else {
        command(&r0, &["REPLICAOF", "NO", "ONE"]).await;
    }
    // A previous owner's leftover on instance 2: the first lock is on {0, 1}.
    command(&s2, &["SET", "job", "leftover", "PX", "300"]).await;
    let held = first
        .try_acquire("job", Duration::from_secs(10))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await; // the leftover is gone
    vip.switch(r0.addr());
    if health {
        let _ = second.health().await;
        command(&r0, &["REPLICAOF", "NO", "ONE"]).await;
    } else {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stolen = second.try_acquire("job", Duration::from_secs(10)).await;
    let overlap = stolen.is_ok() && held.is_valid();
    if let Ok(theirs) = stolen {
        theirs.leave_to_expire();
    }
    held.leave_to_expire();
    overlap
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_behind_a_resp3_connection_does_not_vote() {
    for run in 0..3 {
        assert!(
            !failover("?protocol=resp3", false).await,
            "run {run}: overlap"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_seen_through_health_does_not_vote() {
    for run in 0..3 {
        assert!(!failover("", true).await, "run {run}: overlap");
    }
}
