//! The accept loop: a task per proxied connection, all owned by the proxy's
//! accept task so that dropping the proxy ends them. Apart from the public type,
//! which only starts it, and from the connection, which it only spawns.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::sleep;

use super::connection::Connection;
use super::ProxyState;

/// Pause after a failed `accept` (e.g. out of file descriptors), so it cannot spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

pub(super) async fn accept_loop(
    listener: Arc<Mutex<Option<TcpListener>>>,
    shared: Arc<ProxyState>,
) {
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
