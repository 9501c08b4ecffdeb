//! Shared helpers for the integration tests: real redis-server clusters and
//! sweeps of what our locks left in them.
#![allow(dead_code)]

use std::time::Duration;

use quorumlock::testing::RedisCluster;
use quorumlock::{Builder, LockValue, MemoryInstance, QuorumLocker};
use redis::AsyncCommands;

/// The instance counts every core behaviour is checked at: one Redis, migration
/// (old + new), the smallest fault-tolerant set, classic Redlock.
pub const SIZES: [usize; 4] = [1, 2, 3, 5];

/// A generous per-instance timeout: these tests check logic, not speed, on a
/// loaded two-core machine.
pub const TIMEOUT: Duration = Duration::from_secs(2);

pub fn cluster(n: usize) -> RedisCluster {
    RedisCluster::start(n).expect("start redis-server processes")
}

/// A builder over every instance of `cluster`, with test-friendly timeouts.
pub fn builder(cluster: &RedisCluster) -> Builder {
    QuorumLocker::builder()
        .urls(cluster.urls())
        .instance_timeout(TIMEOUT)
        .default_wait(Duration::from_secs(5))
}

pub async fn locker(cluster: &RedisCluster) -> QuorumLocker {
    builder(cluster).build().await.expect("build locker")
}

/// The value of `key` on each instance: None where absent, and where the server
/// is not running (a killed server holds nothing).
pub async fn values(cluster: &RedisCluster, key: &str) -> Vec<Option<String>> {
    let mut values = Vec::new();
    for i in 0..cluster.len() {
        if !cluster.server(i).is_running() {
            values.push(None);
            continue;
        }
        let mut connection = cluster.connection(i).await.expect("connect");
        values.push(connection.get(key).await.expect("GET"));
    }
    values
}

/// The instances on which `key` holds a value with `token`.
pub async fn holders(cluster: &RedisCluster, key: &str, token: &str) -> Vec<usize> {
    values(cluster, key)
        .await
        .into_iter()
        .enumerate()
        .filter(|(_, value)| {
            value
                .as_deref()
                .and_then(LockValue::parse)
                .is_some_and(|value| value.token == token)
        })
        .map(|(i, _)| i)
        .collect()
}

/// Sets `key` to `value` directly on instance `i`, as another owner would.
pub async fn set(cluster: &RedisCluster, i: usize, key: &str, value: &str) {
    let mut connection = cluster.connection(i).await.expect("connect");
    let _: () = connection.set_ex(key, value, 60).await.expect("SET");
}

/// Deletes `key` directly on instance `i`, as an expiry would.
pub async fn delete(cluster: &RedisCluster, i: usize, key: &str) {
    let mut connection = cluster.connection(i).await.expect("connect");
    let _: () = connection.del(key).await.expect("DEL");
}

/// Keys in each instance's keyspace, summed.
pub async fn total_keys(cluster: &RedisCluster) -> usize {
    let mut total = 0;
    for i in 0..cluster.len() {
        // Every key but the lockers' epoch keys, which stay on purpose.
        total += cluster.keys(i, "*").await.expect("SCAN").len();
    }
    total
}

/// `n` healthy in-memory instances named `m0`, `m1`, ….
pub fn memory_instances(n: usize) -> Vec<MemoryInstance> {
    (0..n)
        .map(|i| MemoryInstance::new(format!("m{i}")))
        .collect()
}

/// A builder over `instances`, in order.
pub fn memory_builder(instances: &[MemoryInstance]) -> Builder {
    instances
        .iter()
        .fold(QuorumLocker::builder(), |builder, instance| {
            builder.memory(instance)
        })
}
pub mod workers;
