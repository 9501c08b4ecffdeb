//! Joining started nodes into one Redis Cluster with `redis-cli --cluster create`,
//! bounded in time: redis-cli waits for the nodes to agree without a limit of its own.

use std::fs::File;
use std::io::{Read, Seek};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::testing::server::{poll_until, spawn_child, RedisServer};
use crate::testing::HarnessError;

/// Its own waits are whole seconds (it polls once a second until the nodes agree);
/// on an idle machine it takes about two.
const CREATE_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `redis-cli --cluster create <nodes> --cluster-replicas <replicas> --cluster-yes`.
///
/// redis-cli makes the first `nodes.len() / (1 + replicas)` nodes primaries, splits
/// the slots between them and makes the others their replicas (all on one host, it
/// warns and goes on); the fixture reads the result back from the nodes rather than
/// relying on that order.
pub(super) fn create(nodes: &[RedisServer], replicas: usize) -> Result<(), HarnessError> {
    let bin = crate::testing::redis_cli_bin();
    let mut command = Command::new(&bin);
    command.arg("--cluster").arg("create");
    command.args(nodes.iter().map(|node| node.addr().to_string()));
    command
        .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
        .stdin(Stdio::null());
    let described = format!("{command:?}").replace('"', "");
    // A file rather than pipes: nothing to drain while waiting, and the output of a
    // redis-cli that had to be killed is still there to quote.
    let mut output = tempfile::tempfile()?;
    command
        .stdout(output.try_clone()?)
        .stderr(output.try_clone()?);
    let mut child = spawn_child(command).map_err(|source| HarnessError::Spawn { bin, source })?;
    let status = poll_until(CREATE_TIMEOUT, || child.try_wait().transpose());
    let reason = match status {
        Some(Ok(status)) if status.success() => return Ok(()),
        Some(Ok(status)) => format!("it exited with {status}"),
        Some(Err(error)) => format!("could not wait for it: {error}"),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            format!("it had not finished after {CREATE_TIMEOUT:?}, so it was killed")
        }
    };
    Err(HarnessError::Tool {
        command: described,
        reason,
        output: read_all(&mut output),
    })
}

fn read_all(file: &mut File) -> String {
    let mut text = String::new();
    match file.rewind().and_then(|()| file.read_to_string(&mut text)) {
        Ok(_) => text,
        Err(error) => format!("(output unreadable: {error})"),
    }
}
