//! A fault-injecting TCP proxy in front of one server. The module is private: the
//! documentation is on [`FaultProxy`], where users see it.

use std::collections::VecDeque;
use std::fmt;
use std::future::{pending, poll_fn};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep, sleep_until, timeout, Instant};

use super::HarnessError;

/// Bytes read from a socket at a time; each read becomes one delayed chunk.
const CHUNK: usize = 16 * 1024;
/// Bytes held per direction (delayed or cut off) before the proxy stops reading and
/// lets TCP flow control push back on the sender.
const MAX_HELD: usize = 1 << 20;
/// Upstream is normally on loopback: a connect that takes this long is a failure.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (e.g. out of file descriptors), so it cannot spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

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

async fn accept_loop(listener: Arc<Mutex<Option<TcpListener>>>, shared: Arc<ProxyState>) {
    let mut connections = JoinSet::new();
    let mut next_id = 0_u64;
    loop {
        tokio::select! {
            accepted = poll_fn(|cx| poll_accept(&listener, cx)) => match accepted {
                None => return,
                Some(Ok((client, peer))) => {
                    next_id += 1;
                    tracing::debug!(id = next_id, %peer, "fault proxy: accepted");
                    connections.spawn(Connection::new(next_id, client, &shared).run());
                }
                Some(Err(error)) => {
                    tracing::debug!(%error, "fault proxy: accept failed");
                    sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(joined) = connections.join_next() => {
                if let Err(error) = joined {
                    tracing::debug!(%error, "fault proxy: connection task failed");
                }
            }
        }
    }
}

/// Accepts from the listener while the proxy owns one; `None` once it was dropped.
fn poll_accept(
    listener: &Mutex<Option<TcpListener>>,
    cx: &mut Context<'_>,
) -> Poll<Option<io::Result<(TcpStream, SocketAddr)>>> {
    match &*listener.lock().unwrap_or_else(PoisonError::into_inner) {
        Some(listener) => listener.poll_accept(cx).map(Some),
        None => Poll::Ready(None),
    }
}

/// Counts a connection as live for as long as its task (running or not) exists.
struct Live(Arc<ProxyState>);

impl Live {
    fn new(shared: Arc<ProxyState>) -> Self {
        shared.live.fetch_add(1, Ordering::Relaxed);
        Self(shared)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Bytes travelling one way, held until their release time.
struct Pipe {
    queue: VecDeque<Chunk>,
    held: usize,
    /// Release time of the last chunk queued: later chunks never go before it.
    last_release: Option<Instant>,
    /// The sender closed its side; passed on once the queue is delivered.
    eof: bool,
    /// The EOF was passed on.
    shut: bool,
}

struct Chunk {
    data: Vec<u8>,
    sent: usize,
    release: Instant,
}

impl Pipe {
    fn new() -> Self {
        Self {
            queue: VecDeque::new(),
            held: 0,
            last_release: None,
            eof: false,
            shut: false,
        }
    }

    fn push(&mut self, data: Vec<u8>, release: Instant) {
        let release = self.last_release.map_or(release, |last| last.max(release));
        self.last_release = Some(release);
        self.held += data.len();
        self.queue.push_back(Chunk {
            data,
            sent: 0,
            release,
        });
    }

    /// The undelivered bytes of the first chunk, if it is due.
    fn due(&self, now: Instant) -> Option<&[u8]> {
        self.queue
            .front()
            .filter(|chunk| chunk.release <= now)
            .map(|chunk| &chunk.data[chunk.sent..])
    }

    fn next_release(&self) -> Option<Instant> {
        self.queue.front().map(|chunk| chunk.release)
    }

    fn advance(&mut self, n: usize) {
        self.held -= n;
        if let Some(chunk) = self.queue.front_mut() {
            chunk.sent += n;
            if chunk.sent == chunk.data.len() {
                self.queue.pop_front();
            }
        }
    }

    /// Drops everything held; whether there was anything.
    fn discard(&mut self) -> bool {
        let had = !self.queue.is_empty();
        self.queue.clear();
        self.held = 0;
        had
    }
}

/// What woke a connection task.
enum Event {
    /// The faults changed; `false` if the channel closed, which cannot happen while
    /// the task holds `shared` (checked anyway: a closed channel would be ready
    /// forever).
    Changed(bool),
    Read(usize, io::Result<usize>),
    Wrote(usize, io::Result<usize>),
    Timer,
    /// The precise timer failed (it cannot, short of a kernel bug): Tokio's timer
    /// carries on alone.
    TimerFailed(io::Error),
}

struct Connection {
    id: u64,
    client: TcpStream,
    /// Connected once neither cut nor blackholed.
    server: Option<TcpStream>,
    faults: watch::Receiver<Faults>,
    epoch: u64,
    /// `[UP]` client to server, `[DOWN]` server to client.
    pipes: [Pipe; 2],
    bufs: [Vec<u8>; 2],
    /// Bytes were discarded by a black hole: the streams can no longer be trusted.
    lost: bool,
    /// Wakes the task at the next release time to the microsecond; `None` off
    /// Linux, or if it could not be made (Tokio's timer is then the only one).
    timer: Option<PreciseTimer>,
    rng: fastrand::Rng,
    shared: Arc<ProxyState>,
    _live: Live,
}

impl Connection {
    fn new(id: u64, client: TcpStream, shared: &Arc<ProxyState>) -> Self {
        // Small writes (one command) must not wait for Nagle: that would add its own
        // latency on top of the injected one.
        let _ = client.set_nodelay(true);
        // Snapshot the reset count at accept: a later `reset_all` covers this
        // connection even if its task has not run yet.
        let faults = shared.faults.subscribe();
        let epoch = faults.borrow().resets;
        Self {
            id,
            client,
            server: None,
            faults,
            epoch,
            pipes: [Pipe::new(), Pipe::new()],
            bufs: [vec![0; CHUNK], vec![0; CHUNK]],
            lost: false,
            timer: PreciseTimer::new(id),
            rng: fastrand::Rng::with_seed(shared.seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            _live: Live::new(Arc::clone(shared)),
            shared: Arc::clone(shared),
        }
    }

    async fn run(mut self) {
        let id = self.id;
        loop {
            let faults = *self.faults.borrow_and_update();
            if faults.resets != self.epoch {
                tracing::debug!(id, "fault proxy: resetting connection");
                return self.abort();
            }
            if faults.blackhole {
                let [up, down] = &mut self.pipes;
                if up.discard() | down.discard() {
                    self.lost = true;
                }
            } else if self.lost {
                tracing::debug!(id, "fault proxy: black hole lifted, resetting connection");
                return self.abort();
            }
            let flowing = !faults.blackhole && !faults.cut;
            if flowing && self.server.is_none() {
                if self.pipes[UP].eof && self.pipes[UP].queue.is_empty() {
                    return; // the client left before it was ever connected upstream
                }
                match timeout(CONNECT_TIMEOUT, TcpStream::connect(self.shared.upstream)).await {
                    Ok(Ok(server)) => {
                        let _ = server.set_nodelay(true);
                        self.server = Some(server);
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(id, %error, "fault proxy: upstream connect failed");
                        return self.abort();
                    }
                    Err(_) => {
                        tracing::debug!(id, "fault proxy: upstream connect timed out");
                        return self.abort();
                    }
                }
                continue; // the faults may have changed while connecting
            }
            if flowing {
                // Pass a close on once everything sent before it is delivered.
                let targets = [self.server.as_mut(), Some(&mut self.client)];
                for (pipe, target) in self.pipes.iter_mut().zip(targets) {
                    let delivered = pipe.eof && pipe.queue.is_empty();
                    if let (true, false, Some(stream)) = (delivered, pipe.shut, target) {
                        let _ = stream.shutdown().await;
                        pipe.shut = true;
                    }
                }
                if self.pipes[UP].shut && self.pipes[DOWN].shut {
                    tracing::debug!(id, "fault proxy: connection closed");
                    return;
                }
            }

            let event = self.next_event(faults, flowing).await;
            // Decide with the faults as they are now, not as they were when waiting
            // began; a change is still seen by the next turn of the loop.
            let faults = *self.faults.borrow();
            match event {
                Event::Changed(true) | Event::Timer => {}
                Event::TimerFailed(error) => {
                    tracing::debug!(id, %error, "fault proxy: timerfd failed, latency in whole ms");
                    self.timer = None;
                }
                Event::Changed(false) => return,
                Event::Read(dir, Ok(0)) => {
                    if dir == UP && faults.blackhole {
                        return; // the client gave up on the vanished host
                    }
                    self.pipes[dir].eof = true;
                }
                Event::Read(dir, Ok(n)) => {
                    if faults.blackhole {
                        self.lost = true;
                    } else {
                        let delay = faults.latency[dir] + up_to(&mut self.rng, faults.jitter[dir]);
                        let data = self.bufs[dir][..n].to_vec();
                        self.pipes[dir].push(data, Instant::now() + delay);
                    }
                }
                Event::Wrote(_, Ok(0)) => {
                    tracing::debug!(id, "fault proxy: peer accepts no more bytes");
                    return self.abort();
                }
                Event::Wrote(dir, Ok(n)) => {
                    self.pipes[dir].advance(n);
                    self.shared.forwarded[dir].fetch_add(n as u64, Ordering::Relaxed);
                }
                Event::Read(_, Err(error)) | Event::Wrote(_, Err(error)) => {
                    tracing::debug!(id, %error, "fault proxy: connection failed");
                    return self.abort();
                }
            }
        }
    }

    /// Waits for the next thing to do. Every branch is cancel safe, and the fault
    /// channel is polled first, so no byte moves once a new fault is set.
    async fn next_event(&mut self, faults: Faults, flowing: bool) -> Event {
        let now = Instant::now();
        let connected = self.server.is_some();
        let [up, down] = &self.pipes;
        let to_server = if flowing { up.due(now) } else { None };
        let to_client = if flowing { down.due(now) } else { None };
        let wake = [up, down]
            .into_iter()
            .filter(|_| flowing)
            .filter_map(Pipe::next_release)
            .filter(|&release| release > now)
            .min();
        // A black hole reads everything (to discard it); otherwise stop reading once
        // enough is held, and at EOF.
        let read_client = !up.eof && (faults.blackhole || up.held < MAX_HELD);
        let read_server = connected && !down.eof && (faults.blackhole || down.held < MAX_HELD);

        let (mut client_r, mut client_w) = self.client.split();
        let (mut server_r, mut server_w) = match self.server.as_mut() {
            Some(server) => {
                let (r, w) = server.split();
                (Some(r), Some(w))
            }
            None => (None, None),
        };
        let [up_buf, down_buf] = &mut self.bufs;
        // Two timers for the next release, whichever fires first. Tokio's rounds up
        // to its next 1 ms tick, so a 250 µs latency would take over 1 ms; the timerfd
        // fires within microseconds of the release, on the same clock while Tokio's
        // time runs (CLOCK_MONOTONIC, `std`'s `Instant`'s, which Tokio's wraps). Tokio's
        // stays for other targets, and for Tokio's paused clock (`start_paused`,
        // `time::pause`): there a release is virtual time, which only Tokio's timer
        // follows (the runtime auto-advances to it when idle), while the timerfd,
        // armed for the same span in real time, would fire later to no effect.
        let precise = match (self.timer.as_mut(), wake) {
            (Some(timer), Some(release)) => match timer.arm(release) {
                Ok(()) => Some(timer),
                Err(error) => return Event::TimerFailed(error),
            },
            _ => None,
        };
        tokio::select! {
            biased;
            changed = self.faults.changed() => Event::Changed(changed.is_ok()),
            wrote = write_some(server_w.as_mut(), to_server), if to_server.is_some() => {
                Event::Wrote(UP, wrote)
            }
            wrote = write_some(Some(&mut client_w), to_client), if to_client.is_some() => {
                Event::Wrote(DOWN, wrote)
            }
            read = client_r.read(up_buf), if read_client => Event::Read(UP, read),
            read = read_some(server_r.as_mut(), down_buf), if read_server => {
                Event::Read(DOWN, read)
            }
            () = sleep_until(wake.unwrap_or(now)), if wake.is_some() => Event::Timer,
            fired = expired(precise), if wake.is_some() => match fired {
                Ok(()) => Event::Timer,
                Err(error) => Event::TimerFailed(error),
            },
        }
    }

    /// Closes both sockets with a reset rather than a normal close.
    fn abort(self) {
        for stream in std::iter::once(&self.client).chain(&self.server) {
            // `set_zero_linger` needs tokio 1.50; the manifest allows 1.40. A zero
            // linger never blocks on close, which is what the deprecation is about.
            #[allow(deprecated)]
            let _ = stream.set_linger(Some(Duration::ZERO));
        }
    }
}

/// Reads from `half`, or waits forever without one.
async fn read_some<R: AsyncRead + Unpin>(half: Option<R>, buf: &mut [u8]) -> io::Result<usize> {
    match half {
        Some(mut half) => half.read(buf).await,
        None => pending().await,
    }
}

/// Writes some of `data` to `half`, or waits forever without both.
async fn write_some<W: AsyncWrite + Unpin>(
    half: Option<W>,
    data: Option<&[u8]>,
) -> io::Result<usize> {
    match (half, data) {
        (Some(mut half), Some(data)) => half.write(data).await,
        _ => pending().await,
    }
}

/// Waits for `timer` to fire, or forever without one.
async fn expired(timer: Option<&mut PreciseTimer>) -> io::Result<()> {
    match timer {
        Some(timer) => timer.expired().await,
        None => pending().await,
    }
}

/// A one-shot timerfd on `CLOCK_MONOTONIC`, registered with the runtime's I/O
/// driver: it wakes the task within microseconds of its deadline, where Tokio's
/// timer wheel has millisecond ticks.
#[cfg(target_os = "linux")]
struct PreciseTimer {
    fd: tokio::io::unix::AsyncFd<rustix::fd::OwnedFd>,
    /// The release it is armed for, until it fires: re-arming for the same one,
    /// as every turn of the connection's loop asks, is skipped.
    armed: Option<Instant>,
}

#[cfg(target_os = "linux")]
impl PreciseTimer {
    /// A new timer, or `None` (logged) if the kernel gives none, e.g. out of file
    /// descriptors.
    fn new(id: u64) -> Option<Self> {
        Self::create()
            .inspect_err(|error| {
                tracing::debug!(id, %error, "fault proxy: no timerfd, latency in whole ms");
            })
            .ok()
    }

    fn create() -> io::Result<Self> {
        use rustix::time::{timerfd_create, TimerfdClockId, TimerfdFlags};
        let flags = TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC;
        let fd = timerfd_create(TimerfdClockId::Monotonic, flags)?;
        // `AsyncFd::register_with_interest` needs tokio 1.51.6 or 1.53.3; the manifest
        // allows 1.40. What the deprecation is about cannot happen here: the `OwnedFd`
        // is owned by the `AsyncFd` and stays open, the same fd, until it is dropped.
        #[allow(deprecated)]
        let fd = tokio::io::unix::AsyncFd::with_interest(fd, tokio::io::Interest::READABLE)?;
        Ok(Self { fd, armed: None })
    }

    /// Arms the timer to fire at `release`, replacing any earlier deadline.
    fn arm(&mut self, release: Instant) -> io::Result<()> {
        use rustix::time::{timerfd_settime, Itimerspec, TimerfdTimerFlags, Timespec};
        if self.armed == Some(release) {
            return Ok(());
        }
        // Relative to now rather than absolute: neither `std` nor Tokio tells the
        // CLOCK_MONOTONIC reading of an `Instant`, and the syscall follows within a
        // microsecond. Never zero, which would disarm the timer instead.
        let wait = release
            .saturating_duration_since(Instant::now())
            .max(Duration::from_nanos(1));
        let value = Itimerspec {
            it_interval: Timespec::default(),
            it_value: Timespec {
                tv_sec: wait.as_secs().try_into().unwrap_or(i64::MAX),
                // Under a billion: fits whatever `Nsecs` is (a C long on some targets).
                tv_nsec: wait.subsec_nanos() as _,
            },
        };
        timerfd_settime(self.fd.get_ref(), TimerfdTimerFlags::empty(), &value)?;
        self.armed = Some(release);
        Ok(())
    }

    /// Waits until the armed deadline passes. Cancel safe: an expiry not yet read
    /// stays in the timerfd (and `armed` with it) for the next call.
    async fn expired(&mut self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            // Eight bytes, the number of expiries; `WouldBlock` (the readiness was
            // stale, e.g. from before a re-arm) clears the readiness and waits again.
            let read = guard.try_io(|fd| {
                let mut count = [0; 8];
                rustix::io::read(fd.get_ref(), &mut count).map_err(io::Error::from)
            });
            if let Ok(read) = read {
                self.armed = None;
                return read.map(drop);
            }
        }
    }
}

/// Never made off Linux, where Tokio's timer is the only one.
#[cfg(not(target_os = "linux"))]
enum PreciseTimer {}

#[cfg(not(target_os = "linux"))]
impl PreciseTimer {
    fn new(_id: u64) -> Option<Self> {
        None
    }

    fn arm(&mut self, _release: Instant) -> io::Result<()> {
        match *self {}
    }

    async fn expired(&mut self) -> io::Result<()> {
        match *self {}
    }
}

/// Uniform in `[0, max]`: jitter needs spread, not secrecy.
fn up_to(rng: &mut fastrand::Rng, max: Duration) -> Duration {
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.u64(0..=nanos))
}

fn seed() -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0x2545_F491_4F6C_DD1D, |since| since.as_nanos() as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_range_and_varies() {
        let mut rng = fastrand::Rng::with_seed(0);
        let max = Duration::from_millis(5);
        let draws: Vec<_> = (0..1000).map(|_| up_to(&mut rng, max)).collect();
        assert!(draws.iter().all(|&d| d <= max));
        assert!(draws.iter().any(|&d| d < max / 4));
        assert!(draws.iter().any(|&d| d > max * 3 / 4));
        assert_eq!(up_to(&mut rng, Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn chunks_never_overtake() {
        let mut pipe = Pipe::new();
        let start = Instant::now();
        pipe.push(b"slow".to_vec(), start + Duration::from_millis(50));
        pipe.push(b"fast".to_vec(), start + Duration::from_millis(1));
        assert_eq!(pipe.due(start + Duration::from_millis(10)), None);
        let later = start + Duration::from_millis(50);
        assert_eq!(pipe.due(later), Some(&b"slow"[..]));
        pipe.advance(2);
        assert_eq!(pipe.due(later), Some(&b"ow"[..]));
        pipe.advance(2);
        assert_eq!(pipe.due(later), Some(&b"fast"[..]));
        assert_eq!(pipe.held, 4);
        assert!(pipe.discard());
        assert_eq!((pipe.held, pipe.due(later)), (0, None));
    }
}
