//! One proxied connection: the task that forwards its bytes both ways and
//! applies each fault as it changes. Apart from the public type, which only
//! flips the faults this task reads.

use std::future::pending;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{sleep_until, timeout, Instant};

use super::jitter::up_to;
use super::pipe::Pipe;
use super::timer::PreciseTimer;
use super::{Faults, ProxyState, DOWN, UP};

/// Bytes read from a socket at a time; each read becomes one delayed chunk.
const CHUNK: usize = 16 * 1024;
/// Bytes held per direction (delayed or cut off) before the proxy stops reading and
/// lets TCP flow control push back on the sender.
const MAX_HELD: usize = 1 << 20;
/// Upstream is normally on loopback: a connect that takes this long is a failure.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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

pub(super) struct Connection {
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
    pub(super) fn new(id: u64, client: TcpStream, shared: &Arc<ProxyState>) -> Self {
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

    pub(super) async fn run(mut self) {
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
