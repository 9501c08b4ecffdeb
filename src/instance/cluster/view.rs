//! What a cluster member's probe saw: which primary serves which slots, each
//! primary's `run_id`, clock and anchor (the epoch hash of the first slot it
//! serves), and the two composite identities the member shows the standing.
//!
//! The standing knows one `run_id` and one epoch per member. A cluster member's
//! `run_id` stands for the whole slot map with every primary's `run_id`: a
//! primary that restarted, a replica that took over, a slot that moved, each
//! changes it, and the member is quarantined as a restarted server is. Its epoch
//! stands for every primary's anchor id and the member's own count of slots
//! found changed at a grant: a primary that lost its keys lost its anchor too.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use redis::{ErrorKind, RedisError, Value};

use crate::instance::info_field;

/// One primary as the probe saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Primary {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) run_id: Arc<str>,
    /// `master_replid`: a promotion gives the new primary a new one, so that a
    /// failover and a failback between two probes still change the view.
    pub(super) replication_id: Arc<str>,
    /// The epoch hash of the first slot it serves: its id stands for the
    /// primary's data set, its `ttl` for the longest TTL set on the primary.
    pub(super) anchor: Arc<str>,
    pub(super) anchor_id: Arc<str>,
    /// The longest TTL the anchor records, as read.
    pub(super) longest_ttl: Duration,
}

/// The slot map and primaries of one probe, and the identities made of them.
#[derive(Debug)]
pub(super) struct View {
    pub(super) ranges: Ranges,
    pub(super) primaries: Vec<Primary>,
    /// The composite `run_id` (see the module's documentation).
    pub(super) run_id: Arc<str>,
    /// The composite epoch.
    pub(super) epoch: Arc<str>,
}

impl View {
    pub(super) fn new(
        ranges: Vec<(u16, u16, usize)>,
        primaries: Vec<Primary>,
        changed: u64,
    ) -> Self {
        let mut servers = DefaultHasher::new();
        let mut data = DefaultHasher::new();
        for &(start, end, primary) in &ranges {
            let primary = &primaries[primary];
            (start, end, &*primary.run_id, &*primary.replication_id).hash(&mut servers);
            (start, &*primary.anchor_id).hash(&mut data);
        }
        changed.hash(&mut data);
        Self {
            // Hex first: reports abbreviate a `run_id` to its first
            // characters, which must tell two clusters apart.
            run_id: format!("{:016x}-cluster", servers.finish()).into(),
            epoch: format!("{:016x}-cluster", data.finish()).into(),
            ranges,
            primaries,
        }
    }

    /// The primary serving `slot`, if any does.
    pub(super) fn primary_of(&self, slot: u16) -> Option<&Primary> {
        let at = self.ranges.partition_point(|&(_, end, _)| end < slot);
        self.ranges
            .get(at)
            .filter(|&&(start, _, _)| start <= slot)
            .map(|&(_, _, primary)| &self.primaries[primary])
    }
}

/// Sorted, disjoint slot ranges (inclusive), each with the index of the
/// primary serving it.
pub(super) type Ranges = Vec<(u16, u16, usize)>;

/// A primary's address as `CLUSTER SLOTS` gives it, before it is probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Address {
    pub(super) host: String,
    pub(super) port: u16,
}

/// `CLUSTER SLOTS` read as sorted slot ranges and the distinct primaries serving
/// them (the first node of each entry), each with the first slot it serves.
pub(super) fn parse_slots(reply: Value) -> Result<(Ranges, Vec<(Address, u16)>), RedisError> {
    let Value::Array(entries) = reply else {
        return Err(unexpected("CLUSTER SLOTS is not an array"));
    };
    let mut ranges = Vec::with_capacity(entries.len());
    let mut primaries: Vec<(Address, u16)> = Vec::new();
    for entry in entries {
        let Value::Array(fields) = entry else {
            return Err(unexpected("a CLUSTER SLOTS entry is not an array"));
        };
        let mut fields = fields.into_iter();
        let (Some(start), Some(end), Some(Value::Array(node))) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err(unexpected(
                "a CLUSTER SLOTS entry lacks its range or primary",
            ));
        };
        let start = slot(start)?;
        let end = slot(end)?;
        let mut node = node.into_iter();
        let (Some(host), Some(port)) = (node.next(), node.next()) else {
            return Err(unexpected("a CLUSTER SLOTS node lacks its address"));
        };
        let host: String = redis::from_redis_value(host).map_err(RedisError::from)?;
        let port: u16 = redis::from_redis_value(port).map_err(RedisError::from)?;
        let address = Address { host, port };
        let index = match primaries.iter().position(|(known, _)| *known == address) {
            Some(index) => {
                primaries[index].1 = primaries[index].1.min(start);
                index
            }
            None => {
                primaries.push((address, start));
                primaries.len() - 1
            }
        };
        ranges.push((start, end, index));
    }
    // In address order, whichever node answered: the first primary's clock is
    // the member's main one (see `Probe::other_clocks`).
    let mut order: Vec<usize> = (0..primaries.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&primaries[a].0, &primaries[b].0);
        (&a.host, a.port).cmp(&(&b.host, b.port))
    });
    let mut renumbered = vec![0; primaries.len()];
    for (new, &old) in order.iter().enumerate() {
        renumbered[old] = new;
    }
    for range in &mut ranges {
        range.2 = renumbered[range.2];
    }
    let primaries = order.iter().map(|&old| primaries[old].clone()).collect();
    ranges.sort_unstable();
    if ranges.windows(2).any(|pair| pair[0].1 >= pair[1].0) || ranges.is_empty() {
        return Err(unexpected("CLUSTER SLOTS ranges overlap or are missing"));
    }
    Ok((ranges, primaries))
}

fn slot(value: Value) -> Result<u16, RedisError> {
    let slot: u16 = redis::from_redis_value(value).map_err(RedisError::from)?;
    if slot >= crate::slot::SLOTS {
        return Err(unexpected("a CLUSTER SLOTS slot is out of range"));
    }
    Ok(slot)
}

/// One primary's answer to the probe's pipeline: `INFO server`, `INFO
/// replication`, `TIME`, `HSETNX` of its anchor, `HMGET` of the anchor's `id`
/// and `ttl`.
pub(super) struct Answer {
    pub(super) run_id: Arc<str>,
    pub(super) replication_id: Arc<str>,
    pub(super) server_time: Duration,
    pub(super) anchor_id: Arc<str>,
    pub(super) longest_ttl_ms: Option<String>,
}

pub(super) fn parse_answer(replies: Vec<Value>) -> Result<Answer, RedisError> {
    let [info, replication, time, _set, read]: [Value; 5] = replies
        .try_into()
        .map_err(|_| unexpected("a primary's probe answered the wrong number of replies"))?;
    let info: String = redis::from_redis_value(info).map_err(RedisError::from)?;
    let (seconds, micros): (u64, u64) = redis::from_redis_value(time).map_err(RedisError::from)?;
    let (id, ttl): (Option<String>, Option<String>) =
        redis::from_redis_value(read).map_err(RedisError::from)?;
    let run_id = info_field(&info, "server", "run_id")?.into();
    let replication: String = redis::from_redis_value(replication).map_err(RedisError::from)?;
    let replication_id = info_field(&replication, "replication", "master_replid")?.into();
    let anchor_id = id
        .filter(|id| !id.is_empty())
        .map(Arc::from)
        .ok_or_else(|| unexpected("the epoch hash holds no id"))?;
    Ok(Answer {
        run_id,
        replication_id,
        server_time: Duration::from_secs(seconds) + Duration::from_micros(micros),
        anchor_id,
        longest_ttl_ms: ttl,
    })
}

pub(super) fn unexpected(what: &str) -> RedisError {
    RedisError::from((
        ErrorKind::UnexpectedReturnType,
        "unexpected reply",
        what.to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary(run_id: &str, anchor_id: &str) -> Primary {
        Primary {
            host: "127.0.0.1".into(),
            port: 7000,
            run_id: run_id.into(),
            replication_id: "x".into(),
            anchor: "a".into(),
            anchor_id: anchor_id.into(),
            longest_ttl: Duration::ZERO,
        }
    }

    #[test]
    fn slots_find_their_primary() {
        let view = View::new(
            vec![(0, 99, 1), (100, 16383, 0)],
            vec![primary("r0", "e0"), primary("r1", "e1")],
            0,
        );
        assert_eq!(&*view.primary_of(0).unwrap().run_id, "r1");
        assert_eq!(&*view.primary_of(99).unwrap().run_id, "r1");
        assert_eq!(&*view.primary_of(100).unwrap().run_id, "r0");
        let gap = View::new(vec![(10, 20, 0)], vec![primary("r0", "e0")], 0);
        assert!(gap.primary_of(5).is_none());
        assert!(gap.primary_of(21).is_none());
    }

    #[test]
    fn identities_change_with_what_they_stand_for() {
        let base = View::new(vec![(0, 16383, 0)], vec![primary("r0", "e0")], 0);
        let same = View::new(vec![(0, 16383, 0)], vec![primary("r0", "e0")], 0);
        assert_eq!((&base.run_id, &base.epoch), (&same.run_id, &same.epoch));
        let restarted = View::new(vec![(0, 16383, 0)], vec![primary("r9", "e0")], 0);
        assert_ne!(base.run_id, restarted.run_id);
        let flushed = View::new(vec![(0, 16383, 0)], vec![primary("r0", "e9")], 0);
        assert_eq!(base.run_id, flushed.run_id);
        assert_ne!(base.epoch, flushed.epoch);
        let moved = View::new(
            vec![(0, 1, 1), (2, 16383, 0)],
            vec![primary("r0", "e0"), primary("r1", "e1")],
            0,
        );
        assert_ne!(base.run_id, moved.run_id);
        let found_changed = View::new(vec![(0, 16383, 0)], vec![primary("r0", "e0")], 1);
        assert_ne!(base.epoch, found_changed.epoch);
    }
}
