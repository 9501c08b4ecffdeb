//! Where the examples find their Redis instances, so that each one runs with no
//! arguments on any machine:
//!
//! 1. `REDIS_URLS` (comma separated) when it is set: your own servers, such as
//!    the five of `docker-compose.yml`;
//! 2. else local `redis-server` processes on free ports, stopped on exit
//!    (`quorumlock::testing::RedisCluster`);
//! 3. else, built with `--features testcontainers` and with Docker running,
//!    `redis:7-alpine` containers (the same `RedisCluster` falls back to them);
//! 4. else in-process [`MemoryInstance`]s: the same lock logic, but nothing is
//!    shared with other processes.
//!
//! Each example says on stdout which one it chose.
#![allow(dead_code)] // each example uses a different part

use quorumlock::testing::RedisCluster;
use quorumlock::{Builder, MemoryInstance, QuorumLocker};

/// The Redis instances of one example run.
pub struct Instances {
    backend: Backend,
}

enum Backend {
    /// `REDIS_URLS`: someone else's servers; the example never stops them.
    Given(Vec<String>),
    /// Servers (or containers) the example started; they stop when dropped.
    Local(RedisCluster),
    Memory(Vec<MemoryInstance>),
}

impl Instances {
    /// `REDIS_URLS` if set, else `n` servers of the example's own. Never fails:
    /// the in-memory instances are the last resort.
    pub fn choose(n: usize) -> Self {
        let given: Vec<String> = std::env::var("REDIS_URLS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(String::from)
            .collect();
        let backend = if !given.is_empty() {
            println!("using the {} instance(s) in REDIS_URLS", given.len());
            Backend::Given(given)
        } else {
            // Starting blocks for a moment; the examples do it before any locking.
            match RedisCluster::start(n) {
                Ok(cluster) if cluster.server(0).pid().is_none() => {
                    println!(
                        "REDIS_URLS is not set and redis-server is not installed: started {n} \
                         redis:7-alpine Docker containers"
                    );
                    Backend::Local(cluster)
                }
                Ok(cluster) => {
                    println!("REDIS_URLS is not set: started {n} local redis-server processes");
                    Backend::Local(cluster)
                }
                Err(err) => {
                    // The harness's message says what to install; keep its first line.
                    let reason = err.to_string();
                    let reason = reason.lines().next().unwrap_or_default();
                    println!(
                        "REDIS_URLS is not set and no local Redis could be started ({reason})"
                    );
                    println!(
                        "=> using {n} in-memory instances (MemoryInstance) inside this process: \
                         the same lock logic, but not shared with other processes"
                    );
                    let memory = (0..n)
                        .map(|i| MemoryInstance::new(format!("memory-{i}")))
                        .collect();
                    Backend::Memory(memory)
                }
            }
        };
        let instances = Self { backend };
        for i in 0..instances.len() {
            println!("  [{i}] {}", instances.name(i));
        }
        instances
    }

    pub fn len(&self) -> usize {
        match &self.backend {
            Backend::Given(urls) => urls.len(),
            Backend::Local(cluster) => cluster.len(),
            Backend::Memory(memory) => memory.len(),
        }
    }

    /// A URL, or the in-memory instance's name.
    pub fn name(&self, i: usize) -> String {
        match &self.backend {
            Backend::Given(urls) => urls[i].clone(),
            Backend::Local(cluster) => cluster.server(i).url(),
            Backend::Memory(memory) => memory[i].name().to_string(),
        }
    }

    /// A builder over every instance, in order.
    pub fn builder(&self) -> Builder {
        self.builder_for(&(0..self.len()).collect::<Vec<_>>())
    }

    /// A builder over the instances at `indices`, in that order.
    pub fn builder_for(&self, indices: &[usize]) -> Builder {
        indices
            .iter()
            .fold(QuorumLocker::builder(), |builder, &i| match &self.backend {
                Backend::Memory(memory) => builder.memory(&memory[i]),
                _ => builder.url(self.name(i)),
            })
    }

    /// Deletes `key` on instance `i` behind its owner's back, as an operator's
    /// `DEL` (or a server that lost its data) would.
    pub async fn delete(&self, i: usize, key: &str) -> Result<(), redis::RedisError> {
        if let Backend::Memory(memory) = &self.backend {
            memory[i].remove(key);
            return Ok(());
        }
        let client = redis::Client::open(self.name(i))?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("DEL")
            .arg(key)
            .query_async::<i64>(&mut connection)
            .await?;
        Ok(())
    }

    /// Takes instance `i` down when it is the example's own (a killed server, a
    /// failing in-memory one); false for the servers in `REDIS_URLS`, which the
    /// example leaves alone.
    pub fn stop(&mut self, i: usize) -> Result<bool, Box<dyn std::error::Error>> {
        match &mut self.backend {
            Backend::Given(_) => Ok(false),
            Backend::Local(cluster) => {
                cluster.kill(i)?;
                Ok(true)
            }
            Backend::Memory(memory) => {
                memory[i].set_failing(true);
                Ok(true)
            }
        }
    }
}

/// The examples' `main`: a plain one-line message and a non-zero exit status on
/// error, never a panic.
pub fn exit(result: Result<(), Box<dyn std::error::Error>>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            let message = err.to_string();
            eprintln!("error: {}", message.lines().next().unwrap_or_default());
            std::process::ExitCode::FAILURE
        }
    }
}
