//! What a node says about the cluster (`CLUSTER NODES`, `CLUSTER INFO`), and the
//! check that every running node finds it healthy and they all agree.
//!
//! Nodes are told apart by port: every node of the fixture is on `127.0.0.1`.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::slot::SLOTS;
use crate::testing::probe::{info_field, query, unexpected};
use crate::testing::server::RedisServer;
use crate::testing::HarnessError;

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) id: String,
    pub(super) port: u16,
    /// The node that gave the view.
    pub(super) myself: bool,
    /// Flagged `master` (which a failed primary whose replica took over still is).
    pub(super) primary: bool,
    /// The id of its primary, for a replica.
    pub(super) primary_id: Option<String>,
    /// Inclusive ranges of the slots it serves.
    pub(super) slots: Vec<(u16, u16)>,
}

/// One node's view of the cluster: an entry per node it knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct View {
    pub(super) entries: Vec<Entry>,
}

/// The part of a view every healthy node must agree on: which node serves which
/// slots, and which primary each replica follows (by port). Failure flags are left
/// out: each node raises and clears them in its own time.
type Agreement = (Vec<(u16, u16, u16)>, BTreeMap<u16, Option<u16>>);

impl View {
    /// Parses `CLUSTER NODES`: `<id> <ip:port@cport[,hostname]> <flags> <primary id or
    /// -> <ping-sent> <pong-recv> <epoch> <link-state> <slot or range>...`; slots being
    /// migrated (`[5461->-id]`) are skipped.
    pub(super) fn parse(text: &str) -> Result<Self, String> {
        let entries = text
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                parse_line(line).ok_or_else(|| format!("unreadable CLUSTER NODES line {line:?}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { entries })
    }

    /// The view of the node at `server`, from `CLUSTER NODES`.
    pub(super) fn of(server: &RedisServer) -> Result<Self, HarnessError> {
        let args = ["CLUSTER", "NODES"];
        let text: String = query(server.addr(), &args)?;
        Self::parse(&text).map_err(|detail| unexpected(server.addr(), &args, detail))
    }

    pub(super) fn myself(&self) -> Option<&Entry> {
        self.entries.iter().find(|entry| entry.myself)
    }

    pub(super) fn by_port(&self, port: u16) -> Option<&Entry> {
        self.entries.iter().find(|entry| entry.port == port)
    }

    pub(super) fn by_id(&self, id: &str) -> Option<&Entry> {
        self.entries.iter().find(|entry| entry.id == id)
    }

    /// The primary serving `slot`, if any.
    pub(super) fn owner(&self, slot: u16) -> Option<&Entry> {
        self.entries.iter().find(|entry| {
            entry
                .slots
                .iter()
                .any(|&(first, last)| (first..=last).contains(&slot))
        })
    }

    /// Slot ranges no node serves, as `a-b, c` for messages; empty if all are served.
    pub(super) fn uncovered(&self) -> String {
        let mut served: Vec<(u16, u16)> = self
            .entries
            .iter()
            .flat_map(|entry| entry.slots.iter().copied())
            .collect();
        served.sort_unstable();
        let mut gaps = String::new();
        let mut next = 0_u32;
        let gap = |first: u32, last: u32, gaps: &mut String| {
            let sep = if gaps.is_empty() { "" } else { ", " };
            let _ = match first == last {
                true => write!(gaps, "{sep}{first}"),
                false => write!(gaps, "{sep}{first}-{last}"),
            };
        };
        for (first, last) in served {
            if u32::from(first) > next {
                gap(next, u32::from(first) - 1, &mut gaps);
            }
            next = next.max(u32::from(last) + 1);
        }
        if next < u32::from(SLOTS) {
            gap(next, u32::from(SLOTS) - 1, &mut gaps);
        }
        gaps
    }

    fn agreement(&self) -> Agreement {
        let mut slots: Vec<(u16, u16, u16)> = self
            .entries
            .iter()
            .flat_map(|entry| entry.slots.iter().map(|&(a, b)| (a, b, entry.port)))
            .collect();
        slots.sort_unstable();
        let roles = self
            .entries
            .iter()
            .map(|entry| {
                let primary = entry.primary_id.as_deref().and_then(|id| self.by_id(id));
                (entry.port, primary.map(|primary| primary.port))
            })
            .collect();
        (slots, roles)
    }
}

fn parse_line(line: &str) -> Option<Entry> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 8 {
        return None;
    }
    // `ip:port@cport` or `ip:port@cport,hostname`.
    let address = fields[1].split(['@', ',']).next()?;
    let port = address.rsplit_once(':')?.1.parse().ok()?;
    let flags: Vec<&str> = fields[2].split(',').collect();
    let slots = fields[8..]
        .iter()
        .filter(|slot| !slot.starts_with('['))
        .map(|slot| match slot.split_once('-') {
            Some((first, last)) => Some((first.parse().ok()?, last.parse().ok()?)),
            None => slot.parse().ok().map(|slot| (slot, slot)),
        })
        .collect::<Option<_>>()?;
    Some(Entry {
        id: fields[0].to_owned(),
        port,
        myself: flags.contains(&"myself"),
        primary: flags.contains(&"master"),
        primary_id: (fields[3] != "-").then(|| fields[3].to_owned()),
        slots,
    })
}

/// `Ok` when every running node says `cluster_state:ok` with all 16384 slots served
/// by healthy primaries, knows all the nodes, agrees with the others on who serves
/// which slots and who follows whom, and, if a replica, has finished its sync.
/// Otherwise what the first node found wanting is missing.
pub(super) fn check_healthy(nodes: &[RedisServer]) -> Result<(), String> {
    let mut agreed: Option<(usize, Agreement)> = None;
    let mut running = 0;
    for (i, node) in nodes.iter().enumerate() {
        if !node.is_running() {
            continue;
        }
        running += 1;
        let who = format!("node {i} ({})", node.addr());
        let info: String =
            query(node.addr(), &["CLUSTER", "INFO"]).map_err(|e| format!("{who}: {e}"))?;
        let view = View::of(node).map_err(|e| format!("{who}: {e}"))?;
        let field = |name| info_field(&info, name).unwrap_or("?");
        if field("cluster_state") != "ok" || field("cluster_slots_ok") != SLOTS.to_string() {
            let uncovered = view.uncovered();
            let uncovered = match uncovered.is_empty() {
                true => String::new(),
                false => format!(", no node serves slots {uncovered}"),
            };
            return Err(format!(
                "{who} says cluster_state:{}, cluster_slots_ok:{} of {SLOTS}, \
                 cluster_slots_pfail:{}, cluster_slots_fail:{}{uncovered}",
                field("cluster_state"),
                field("cluster_slots_ok"),
                field("cluster_slots_pfail"),
                field("cluster_slots_fail"),
            ));
        }
        if field("cluster_known_nodes") != nodes.len().to_string() {
            return Err(format!(
                "{who} knows {} of the {} nodes",
                field("cluster_known_nodes"),
                nodes.len()
            ));
        }
        let agreement = view.agreement();
        match &agreed {
            None => agreed = Some((i, agreement)),
            Some((first, theirs)) if *theirs != agreement => {
                return Err(format!(
                    "{who} and node {first} disagree on which primary serves which slots, \
                     or which replica follows which primary"
                ));
            }
            Some(_) => {}
        }
        if view.myself().is_some_and(|me| !me.primary) {
            let replication: String =
                query(node.addr(), &["INFO", "replication"]).map_err(|e| format!("{who}: {e}"))?;
            let link = info_field(&replication, "master_link_status").unwrap_or("?");
            if link != "up" {
                return Err(format!(
                    "replica {who} has not synced with its primary yet (master_link_status:{link})"
                ));
            }
        }
    }
    match running {
        0 => Err("no node is running".to_owned()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host4 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master - 0 1426238318243 3 connected 10923-16383 [16000->-67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1]
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005 slave,fail 67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 0 1426238316232 5 connected
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5459 5460
";

    #[test]
    fn parses_roles_slots_and_flags() {
        let view = View::parse(NODES).expect("parses");
        assert_eq!(view.entries.len(), 5);
        let me = view.myself().expect("myself");
        assert_eq!((me.port, me.primary), (30001, true));
        assert_eq!(me.slots, vec![(0, 5459), (5460, 5460)]);
        let replica = view.by_port(30004).expect("30004");
        assert!(!replica.primary);
        assert_eq!(replica.primary_id.as_deref(), Some(me.id.as_str()));
        assert!(!view.by_port(30005).expect("30005").primary);
        // The migrating slot stays with its owner.
        assert_eq!(view.owner(16000).map(|e| e.port), Some(30003));
        assert_eq!(view.owner(5460).map(|e| e.port), Some(30001));
        assert_eq!(view.owner(5461).map(|e| e.port), Some(30002));
        assert_eq!(view.uncovered(), "");
    }

    #[test]
    fn names_the_slots_nobody_serves() {
        let view = View::parse(
            "a 127.0.0.1:1@2 myself,master - 0 0 1 connected 1-5 7\n\
             b 127.0.0.1:3@4 master - 0 0 1 connected 100-16382\n",
        )
        .expect("parses");
        assert_eq!(view.uncovered(), "0, 6, 8-99, 16383");
        assert!(View::parse("garbage").is_err());
    }

    #[test]
    fn agreement_ignores_failure_flags_but_not_roles() {
        let view = View::parse(NODES).expect("parses");
        let flagged = View::parse(&NODES.replace("slave,fail", "slave")).expect("parses");
        assert_eq!(view.agreement(), flagged.agreement());
        let moved = View::parse(&NODES.replace("5461-10922", "5461-10921")).expect("parses");
        assert_ne!(view.agreement(), moved.agreement());
    }
}
