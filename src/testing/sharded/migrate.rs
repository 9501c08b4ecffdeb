//! Moving one slot from its primary to another, keys and all, as `redis-cli
//! --cluster reshard` does: the target imports, the source migrates, `MIGRATE`
//! moves the keys a batch at a time, then every primary is told the new owner.

use std::time::Duration;

use super::query;
use super::topology::View;
use super::ShardedCluster;
use crate::testing::HarnessError;

/// Keys moved per `MIGRATE`.
const BATCH: usize = 100;
/// `MIGRATE`'s own timeout, in milliseconds.
const MIGRATE_TIMEOUT_MS: &str = "5000";

impl ShardedCluster {
    /// Moves `slot`, with its keys, from the primary serving it to primary
    /// `to`, and waits until every running node agrees (see
    /// [`wait_until_ok`](Self::wait_until_ok)). While it runs, clients see
    /// `ASK` redirections and `TRYAGAIN` for commands over keys on both sides:
    /// the window a test of a migration wants. `pause` waits between the
    /// migration's steps (after the slot is marked importing and migrating, and
    /// after the keys moved), to widen that window.
    ///
    /// # Errors
    ///
    /// [`HarnessError::InvalidRequest`] if `to` is not a running primary or
    /// already serves the slot; [`HarnessError::Command`] if a step fails;
    /// [`HarnessError::Timeout`] if the nodes do not agree in 30 s.
    pub fn migrate_slot(
        &mut self,
        slot: u16,
        to: usize,
        pause: Duration,
    ) -> Result<(), HarnessError> {
        let from = self.slot_primary(slot)?;
        let invalid = |reason: String| HarnessError::InvalidRequest {
            fixture: "ShardedCluster",
            reason,
        };
        if from == to {
            return Err(invalid(format!("node {to} already serves slot {slot}")));
        }
        if !self.primaries()?.contains(&to) {
            return Err(invalid(format!("node {to} is not a running primary")));
        }
        let (source, target) = (self.node(from).addr(), self.node(to).addr());
        let id = |node: usize| -> Result<String, HarnessError> {
            let view = View::of(self.node(node))?;
            view.myself()
                .map(|me| me.id.clone())
                .ok_or_else(|| invalid(format!("node {node} does not name itself")))
        };
        let (source_id, target_id) = (id(from)?, id(to)?);
        let slot_text = slot.to_string();
        let () = query(
            target,
            &["CLUSTER", "SETSLOT", &slot_text, "IMPORTING", &source_id],
        )?;
        let () = query(
            source,
            &["CLUSTER", "SETSLOT", &slot_text, "MIGRATING", &target_id],
        )?;
        std::thread::sleep(pause);
        // Bounded: every round moves up to BATCH keys, and the slot holds a
        // finite number.
        for _ in 0..10_000 {
            let batch = BATCH.to_string();
            let keys: Vec<String> =
                query(source, &["CLUSTER", "GETKEYSINSLOT", &slot_text, &batch])?;
            if keys.is_empty() {
                break;
            }
            let port = target.port().to_string();
            let host = target.ip().to_string();
            let mut args = vec!["MIGRATE", &host, &port, "", "0", MIGRATE_TIMEOUT_MS, "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            let _: redis::Value = query(source, &args)?;
        }
        std::thread::sleep(pause);
        // The target first, as redis-cli does: it then owns the slot whatever
        // the source says.
        let () = query(
            target,
            &["CLUSTER", "SETSLOT", &slot_text, "NODE", &target_id],
        )?;
        let () = query(
            source,
            &["CLUSTER", "SETSLOT", &slot_text, "NODE", &target_id],
        )?;
        for node in self.primaries()? {
            if node != from && node != to {
                let () = query(
                    self.node(node).addr(),
                    &["CLUSTER", "SETSLOT", &slot_text, "NODE", &target_id],
                )?;
            }
        }
        self.wait_until_ok(Duration::from_secs(30))
    }
}
