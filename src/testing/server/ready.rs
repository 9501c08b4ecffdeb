//! Whether a server answers, and the wait for it.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

const PING_TIMEOUT: Duration = Duration::from_millis(200);
const MAX_POLL_PAUSE: Duration = Duration::from_millis(50);

/// Calls `probe` with growing pauses until it returns `Some` or `timeout` has passed.
pub(in crate::testing) fn poll_until<T>(
    timeout: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        thread::sleep(pause.min(left));
        pause = (pause * 2).min(MAX_POLL_PAUSE);
    }
}

/// Whether a server on `port` answers a raw `PING`. `NOAUTH` counts: the server is up,
/// it just wants a password (`--requirepass`, ACLs). `LOADING` and silence do not.
pub(super) fn answers_ping(port: u16) -> bool {
    ping(port).is_ok_and(|reply| reply.starts_with(b"+PONG") || reply.starts_with(b"-NOAUTH"))
}

fn ping(port: u16) -> io::Result<Vec<u8>> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, PING_TIMEOUT)?;
    stream.set_read_timeout(Some(PING_TIMEOUT))?;
    stream.set_write_timeout(Some(PING_TIMEOUT))?;
    stream.write_all(b"*1\r\n$4\r\nPING\r\n")?;
    let mut reply = Vec::new();
    let mut chunk = [0; 64];
    // Replies to PING are one short line; the length cap bounds the loop regardless.
    while !reply.ends_with(b"\r\n") && reply.len() < 256 {
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            break;
        }
        reply.extend_from_slice(&chunk[..read]);
    }
    Ok(reply)
}
