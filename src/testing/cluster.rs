//! K independent Redis servers: the N instances of a Redlock deployment.

use std::thread;

use redis::aio::MultiplexedConnection;
use redis::RedisResult;

use super::server::{RedisServer, RedisServerBuilder};
use super::HarnessError;

/// Independent Redis servers, indexed `0..len()`; all are killed when it is dropped.
///
/// Methods taking an index panic if it is out of range, as slice indexing does.
#[derive(Debug)]
pub struct RedisCluster {
    servers: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `k` servers with default settings; see [`RedisServer::start`].
    pub fn start(k: usize) -> Result<Self, HarnessError> {
        Self::start_with(k, &RedisServerBuilder::default())
    }

    /// Starts `k` servers with the same settings.
    ///
    /// With [`RedisServerBuilder::clock_rate`] every server runs the clock shim, so any
    /// of them can have its clock changed later with
    /// [`set_clock_rate`](Self::set_clock_rate):
    ///
    /// ```
    /// # fn main() -> Result<(), quorumlock::testing::HarnessError> {
    /// use quorumlock::testing::{RedisCluster, RedisServer};
    ///
    /// let mut cluster = RedisCluster::start_with(3, &RedisServer::builder().clock_rate(1.0))?;
    /// cluster.set_clock_rate(2, 2.0)?; // instance 2's keys now expire twice as fast
    /// # Ok(())
    /// # }
    /// ```
    pub fn start_with(k: usize, builder: &RedisServerBuilder) -> Result<Self, HarnessError> {
        Self::start_each(&vec![builder.clone(); k])
    }

    /// Starts one server per builder, in order: server `i` has `builders[i]`'s settings.
    ///
    /// For a cluster where only some instances run the clock shim:
    ///
    /// ```
    /// # fn main() -> Result<(), quorumlock::testing::HarnessError> {
    /// use quorumlock::testing::{RedisCluster, RedisServer};
    ///
    /// let plain = RedisServer::builder();
    /// let fast = RedisServer::builder().clock_rate(2.0);
    /// let cluster = RedisCluster::start_each(&[plain.clone(), plain, fast])?;
    /// assert_eq!(cluster.server(0).clock_rate(), None);
    /// assert_eq!(cluster.server(2).clock_rate(), Some(2.0));
    /// # Ok(())
    /// # }
    /// ```
    pub fn start_each(builders: &[RedisServerBuilder]) -> Result<Self, HarnessError> {
        // Starting is mostly waiting for the server to boot, so overlap the waits.
        let results: Vec<_> = thread::scope(|scope| {
            let starts: Vec<_> = builders
                .iter()
                .map(|builder| scope.spawn(|| builder.start()))
                .collect();
            starts
                .into_iter()
                .map(|start| {
                    start
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        });
        // On the first error the servers that did start are dropped, hence killed.
        let servers = results.into_iter().collect::<Result<_, _>>()?;
        Ok(Self { servers })
    }

    /// The servers, for a fixture built on them.
    pub(super) fn into_servers(self) -> Vec<RedisServer> {
        self.servers
    }

    /// Number of servers.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Whether the cluster has no server.
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// `redis://127.0.0.1:port` of every server, in index order.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(RedisServer::url).collect()
    }

    /// `rediss://127.0.0.1:tls_port` of every server, in index order, for
    /// servers started with [`RedisServerBuilder::tls`]; servers without TLS
    /// are left out.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), quorumlock::testing::HarnessError> {
    /// use quorumlock::testing::{RedisCluster, RedisServer};
    ///
    /// let tls = RedisServer::builder().tls("server.crt", "server.key", "ca.crt");
    /// let cluster = RedisCluster::start_with(3, &tls)?;
    /// assert_eq!(cluster.tls_urls().len(), 3);
    /// # Ok(())
    /// # }
    /// ```
    pub fn tls_urls(&self) -> Vec<String> {
        self.servers
            .iter()
            .filter_map(RedisServer::tls_url)
            .collect()
    }

    /// All servers, in index order.
    pub fn servers(&self) -> &[RedisServer] {
        &self.servers
    }

    /// Server `i`.
    pub fn server(&self, i: usize) -> &RedisServer {
        &self.servers[i]
    }

    /// Server `i`, for its fault controls.
    pub fn server_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.servers[i]
    }

    /// Kills server `i`; see [`RedisServer::kill`].
    pub fn kill(&mut self, i: usize) -> Result<(), HarnessError> {
        self.servers[i].kill()
    }

    /// Pauses server `i`; see [`RedisServer::pause`].
    pub fn pause(&mut self, i: usize) -> Result<(), HarnessError> {
        self.servers[i].pause()
    }

    /// Resumes server `i`; see [`RedisServer::resume`].
    pub fn resume(&mut self, i: usize) -> Result<(), HarnessError> {
        self.servers[i].resume()
    }

    /// Replaces server `i` with an empty one on the same port; see
    /// [`RedisServer::restart_empty`].
    pub fn restart_empty(&mut self, i: usize) -> Result<(), HarnessError> {
        self.servers[i].restart_empty()
    }

    /// Changes the rate of server `i`'s clocks; see [`RedisServer::set_clock_rate`].
    pub fn set_clock_rate(&mut self, i: usize, rate: f64) -> Result<(), HarnessError> {
        self.servers[i].set_clock_rate(rate)
    }

    /// Changes the shift of server `i`'s wall clocks; see
    /// [`RedisServer::set_clock_offset_ms`].
    pub fn set_clock_offset_ms(&mut self, i: usize, offset_ms: i64) -> Result<(), HarnessError> {
        self.servers[i].set_clock_offset_ms(offset_ms)
    }

    /// A new connection to server `i`, for inspecting keys directly. It has redis-rs's
    /// default timeouts, so a paused server gives an error rather than a hang.
    pub async fn connection(&self, i: usize) -> RedisResult<MultiplexedConnection> {
        let client = redis::Client::open(self.servers[i].url())?;
        client.get_multiplexed_async_connection().await
    }

    /// Keys of server `i` matching the glob `pattern`, sorted, apart from the
    /// data-set identity each locker keeps on purpose (ending in
    /// [`EPOCH_KEY`](crate::EPOCH_KEY)). Uses `SCAN`, not `KEYS`.
    pub async fn keys(&self, i: usize, pattern: &str) -> RedisResult<Vec<String>> {
        let mut connection = self.connection(i).await?;
        let mut keys = Vec::new();
        let mut cursor = 0_u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut connection)
                .await?;
            keys.extend(batch);
            // SCAN guarantees termination (cursor 0) but may repeat keys.
            if next == 0 {
                break;
            }
            cursor = next;
        }
        keys.retain(|key| !key.ends_with(crate::EPOCH_KEY));
        keys.sort_unstable();
        keys.dedup();
        Ok(keys)
    }

    /// `(index, key)` for every key matching `pattern` on every server, sorted.
    ///
    /// Killed servers are skipped: they hold no keys. A paused server gives an error.
    pub async fn keys_everywhere(&self, pattern: &str) -> RedisResult<Vec<(usize, String)>> {
        let mut found = Vec::new();
        for (i, server) in self.servers.iter().enumerate() {
            if server.is_running() {
                found.extend(self.keys(i, pattern).await?.into_iter().map(|key| (i, key)));
            }
        }
        Ok(found)
    }
}
