//! Which ports a server gets: free ones, never Redis's default, and whether
//! they are the server's own.

use std::io;
use std::net::{Ipv4Addr, TcpListener};

/// The default Redis port may belong to a real server on the developer's machine.
const DEFAULT_REDIS_PORT: u16 = 6379;

/// A port nobody listens on right now. The server binds it a moment later, so another
/// process can still take it first: callers retry.
pub(super) fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// The ports one server listens on, kept across restarts: the plain one, and the TLS
/// port and cluster bus port of servers that have them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ports {
    pub(super) plain: u16,
    pub(super) tls: Option<u16>,
    pub(super) cluster_bus: Option<u16>,
}

impl Ports {
    /// Free ports for a server with these needs, or `None` when the picks are unusable
    /// (Redis's default port, or twice the same): the caller picks again.
    pub(super) fn pick(tls: bool, cluster_bus: bool) -> io::Result<Option<Self>> {
        let ports = Self {
            plain: free_port()?,
            tls: if tls { Some(free_port()?) } else { None },
            cluster_bus: if cluster_bus {
                Some(free_port()?)
            } else {
                None
            },
        };
        let all: Vec<u16> = ports.all().collect();
        let usable = all
            .iter()
            .enumerate()
            .all(|(i, port)| *port != DEFAULT_REDIS_PORT && !all[..i].contains(port));
        Ok(usable.then_some(ports))
    }

    /// Every port of the server, the plain one first.
    pub(super) fn all(&self) -> impl Iterator<Item = u16> {
        [Some(self.plain), self.tls, self.cluster_bus]
            .into_iter()
            .flatten()
    }
}

/// Whether process `pid` holds the listening socket of `port`, read from `/proc`.
/// Unknown (unreadable `/proc`) counts as yes: then PING alone decides.
#[cfg(target_os = "linux")]
pub(super) fn owns_port(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return true;
    };
    let local = format!(":{port:04X}");
    // Columns: sl, local_address (hex ip:port), rem_address, st (0A = LISTEN), ..., inode.
    let sockets: Vec<String> = table
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|cols| cols.len() > 9 && cols[1].ends_with(&local) && cols[3] == "0A")
        .map(|cols| format!("socket:[{}]", cols[9]))
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return true;
    };
    fds.flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|target| {
            sockets
                .iter()
                .any(|socket| target.as_os_str() == socket.as_str())
        })
}

#[cfg(not(target_os = "linux"))]
pub(super) fn owns_port(_pid: u32, _port: u16) -> bool {
    true
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn owns_port_tells_the_listener_from_other_processes() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = listener.local_addr().expect("addr").port();
        assert!(owns_port(std::process::id(), port));
        // Our parent (cargo or nextest) does not hold this socket.
        let parent = std::os::unix::process::parent_id();
        assert!(!owns_port(parent, port));
        drop(listener);
        assert!(!owns_port(std::process::id(), port));
    }
}
