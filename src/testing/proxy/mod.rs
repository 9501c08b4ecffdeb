//! A fault-injecting TCP proxy in front of one server. The module is private: the
//! documentation is on [`FaultProxy`], where users see it.
//!
//! Here, the public type and the faults it sets; in `accept`, the loop that
//! takes connections; in `connection`, the task that forwards one; in `pipe`,
//! the bytes it holds one way; in `timer`, the precise timer that releases them;
//! in `jitter`, the random part of a delay.

mod accept;
mod connection;
mod jitter;
mod pipe;
mod timer;

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use self::accept::accept_loop;
use self::jitter::seed;
use super::HarnessError;

const UP: usize = 0;
const DOWN: usize = 1;

/// Which way bytes travel through a [`FaultProxy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the client to the upstream server: requests.
    ToServer,
    /// From the upstream server to the client: replies.
    ToClient,
    /// Both ways: a setter applies the value to each direction.
    Both,
}

impl Direction {
    fn indices(self) -> &'static [usize] {
        match self {
            Self::ToServer => &[UP],
            Self::ToClient => &[DOWN],
            Self::Both => &[UP, DOWN],
        }
    }
}

/// The current faults, shared with every connection task through a watch channel.
#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    latency: [Duration; 2],
    jitter: [Duration; 2],
    blackhole: bool,
    cut: bool,
    /// Bumped by `reset_all`; a connection accepted under an older value is reset.
    resets: u64,
}

struct ProxyState {
    upstream: SocketAddr,
    faults: watch::Sender<Faults>,
    live: AtomicUsize,
    forwarded: [AtomicU64; 2],
    seed: u64,
}

/// An in-process TCP proxy to one upstream server, with network faults switchable
/// while it runs.
///
/// The proxy listens on a free port of `127.0.0.1` and forwards every connection to
/// one upstream address, byte for byte, from tasks on the Tokio runtime that called
/// [`start`](Self::start). Point a client at [`url`](Self::url) instead of the server's
/// own URL, then inject faults:
///
/// | Fault | Call | What the client sees |
/// |---|---|---|
/// | Delay | [`set_latency`](FaultProxy::set_latency), [`set_jitter`](FaultProxy::set_jitter) | slow replies, in order |
/// | Vanished host | [`blackhole`](FaultProxy::blackhole) | no reply, no error: only its own timeouts fire |
/// | Partition | [`cut`](FaultProxy::cut), [`heal`](FaultProxy::heal) | no reply until healed, then every reply |
/// | Crash of the link | [`reset_all`](FaultProxy::reset_all) | `connection reset by peer` |
///
/// Unlike [`RedisServer::pause`](super::RedisServer::pause), which stops the whole
/// server, these faults affect only the connections through this proxy: one server can
/// sit behind several proxies, each a different network path to it.
///
/// Every fault applies at once to the connections already open and to new ones: after
/// a setter returns, no byte is forwarded that the new setting would hold back. The
/// setters only flip shared state, so they are cheap, synchronous and callable from
/// any thread.
///
/// # Example
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::{Duration, Instant};
/// use quorumlock::testing::{Direction, FaultProxy, RedisServer};
///
/// let server = RedisServer::start()?;
/// tokio::runtime::Runtime::new()?.block_on(async {
///     let proxy = FaultProxy::start(server.addr()).await?;
///     let client = redis::Client::open(proxy.url())?; // not server.url()
///     let mut connection = client.get_multiplexed_async_connection().await?;
///
///     proxy.set_latency(Direction::ToServer, Duration::from_millis(20));
///     let started = Instant::now();
///     let _: () = redis::cmd("PING").query_async(&mut connection).await?;
///     assert!(started.elapsed() >= Duration::from_millis(20));
///
///     proxy.cut(); // a partition: the next command waits...
///     let ping = redis::cmd("PING");
///     let waiting = ping.query_async::<String>(&mut connection);
///     tokio::pin!(waiting);
///     let short = Duration::from_millis(100);
///     assert!(tokio::time::timeout(short, &mut waiting).await.is_err());
///     proxy.heal(); // ...and completes once it heals
///     assert_eq!(waiting.await?, "PONG");
///     Ok::<_, Box<dyn std::error::Error>>(())
/// })?;
/// # Ok(())
/// # }
/// ```
///
/// Dropping the proxy closes its port at once, and every proxied connection when the
/// runtime next runs (see [`Drop`](#impl-Drop-for-FaultProxy)).
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<ProxyState>,
    /// ProxyState with the accept task so that `drop` can close the port synchronously.
    listener: Arc<Mutex<Option<TcpListener>>>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Binds a free port on `127.0.0.1` and starts forwarding every connection to it
    /// to `upstream`, with no faults.
    ///
    /// Each accepted connection is connected upstream at once (unless the proxy is
    /// [`cut`](Self::cut) or [blackholed](Self::blackhole)); if that fails, e.g. because
    /// the server is down, the client's connection is reset.
    ///
    /// # Errors
    ///
    /// [`HarnessError::Io`] if no port can be bound, or when called outside a Tokio
    /// runtime.
    pub async fn start(upstream: SocketAddr) -> Result<Self, HarnessError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(io::Error::other("FaultProxy::start needs a Tokio runtime").into());
        }
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let (faults, _) = watch::channel(Faults::default());
        let shared = Arc::new(ProxyState {
            upstream,
            faults,
            live: AtomicUsize::new(0),
            forwarded: [AtomicU64::new(0), AtomicU64::new(0)],
            seed: seed(),
        });
        let listener = Arc::new(Mutex::new(Some(listener)));
        let accept = tokio::spawn(accept_loop(Arc::clone(&listener), Arc::clone(&shared)));
        tracing::debug!(%addr, %upstream, "fault proxy started");
        Ok(Self {
            addr,
            shared,
            listener,
            accept,
        })
    }

    /// The address clients connect to: `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `redis://127.0.0.1:port`: the URL to give a client instead of the server's.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.addr.port())
    }

    /// The server every connection is forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// Sets a fixed one-way delay for bytes travelling in `direction`; zero (the
    /// default) removes it.
    ///
    /// Each chunk of bytes is held for the latency plus a random jitter (see
    /// [`set_jitter`](Self::set_jitter)) from when the proxy read it, and never overtakes
    /// an earlier chunk: bytes keep their order, so a chunk may wait longer behind a
    /// slower one. The new delay applies to bytes read after this call; bytes already
    /// held keep the delay they were given. A round trip pays the `ToServer` and the
    /// `ToClient` latency.
    ///
    /// Precision: on Linux a chunk is released within some tens of microseconds after
    /// its time (a timerfd per connection), so sub-millisecond latencies such as a
    /// LAN's 250 µs hold; a busy runtime can add to that. Elsewhere Tokio's timer
    /// rounds each delay up to its next millisecond tick, so a delay under 1 ms costs
    /// about 1 to 2 ms. Under Tokio's paused clock (`start_paused`,
    /// `tokio::time::pause`) delays are virtual time, as Tokio's own timers are.
    pub fn set_latency(&self, direction: Direction, latency: Duration) {
        self.shared.faults.send_modify(|faults| {
            for &i in direction.indices() {
                faults.latency[i] = latency;
            }
        });
    }

    /// Sets a random extra delay for bytes travelling in `direction`: each chunk waits
    /// an extra duration drawn uniformly from `[0, jitter]`, on top of the latency.
    /// Order is still kept (see [`set_latency`](Self::set_latency)). Zero, the default,
    /// removes it.
    pub fn set_jitter(&self, direction: Direction, jitter: Duration) {
        self.shared.faults.send_modify(|faults| {
            for &i in direction.indices() {
                faults.jitter[i] = jitter;
            }
        });
    }

    /// Turns the upstream host into a black hole, or back.
    ///
    /// While on, the proxy behaves like a host that vanished without a trace: it still
    /// accepts connections, and it reads and **discards** every byte in both directions
    /// (including bytes it was still holding back for latency or a cut), so nothing is
    /// forwarded and nothing is answered, not even with an error or a close. Clients
    /// find out only through their own timeouts. New connections are not connected
    /// upstream while it is on. It overrides [`cut`](Self::cut).
    ///
    /// Turning it off **resets** (as [`reset_all`](Self::reset_all) does) every
    /// connection that lost bytes meanwhile, because its byte stream is now corrupt:
    /// a request went unanswered, or a reply went missing. Connections that sent nothing
    /// while it was on carry on as before.
    pub fn blackhole(&self, on: bool) {
        self.shared
            .faults
            .send_modify(|faults| faults.blackhole = on);
    }

    /// Partitions the proxy from its clients: bytes in both directions are held, not
    /// delivered and not dropped, and new connections are accepted but not connected
    /// upstream until [`heal`](Self::heal). Up to 1 MiB is held per direction and
    /// connection; beyond that the proxy stops reading and TCP flow control holds the
    /// rest in the sender. Cutting a cut proxy does nothing.
    pub fn cut(&self) {
        self.shared.faults.send_modify(|faults| faults.cut = true);
    }

    /// Ends a [`cut`](Self::cut): the held bytes are delivered in order, as TCP
    /// retransmission would after a short partition, and waiting new connections are
    /// connected upstream. Healing a proxy that is not cut does nothing.
    pub fn heal(&self) {
        self.shared.faults.send_modify(|faults| faults.cut = false);
    }

    /// Closes every connection open now abruptly, on both the client and the upstream
    /// side, with a TCP reset (`SO_LINGER` zero) where the platform allows: clients see
    /// `connection reset by peer` (or a broken pipe), and bytes the proxy held are lost.
    /// New connections are served normally, and the faults stay as they are.
    ///
    /// No further byte is forwarded on those connections after this returns; their
    /// sockets are closed when the runtime next runs their tasks, so
    /// [`connections`](Self::connections) drops to zero shortly after, not at once.
    pub fn reset_all(&self) {
        self.shared.faults.send_modify(|faults| faults.resets += 1);
    }

    /// The number of proxied connections currently open: accepted and not yet closed,
    /// including those waiting for a cut to heal or sitting in a black hole.
    pub fn connections(&self) -> usize {
        self.shared.live.load(Ordering::Relaxed)
    }

    /// Bytes delivered in `direction` since the proxy started, summed over all its
    /// connections (`Both` adds the two directions). Held and discarded bytes do not
    /// count until, respectively, they are delivered or never.
    pub fn bytes_forwarded(&self, direction: Direction) -> u64 {
        direction
            .indices()
            .iter()
            .map(|&i| self.shared.forwarded[i].load(Ordering::Relaxed))
            .sum()
    }
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let faults = *self.shared.faults.borrow();
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .field("connections", &self.connections())
            .field("latency", &faults.latency)
            .field("jitter", &faults.jitter)
            .field("blackhole", &faults.blackhole)
            .field("cut", &faults.cut)
            .finish()
    }
}

/// Closes the port before returning, so connecting to it fails from then on, and
/// aborts the proxy's tasks, which closes every proxied connection on both sides when
/// the runtime next runs them. No task outlives the proxy for longer than that.
impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.listener
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        // The accept task owns the connection tasks in a JoinSet: dropping it (on
        // abort) aborts them all.
        self.accept.abort();
    }
}
