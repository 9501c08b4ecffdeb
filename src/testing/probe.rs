//! Blocking commands to the servers of the fixtures made of several roles
//! ([`ShardedCluster`](super::ShardedCluster), [`SentinelSet`](super::SentinelSet)),
//! and the bounded waits built on them.
//!
//! Each command opens its own connection with short timeouts, so a killed or paused
//! server costs one timeout rather than a hang, and a fixture's checks never share
//! state with the connections of the code under test.

use std::net::SocketAddr;
use std::time::Duration;

use redis::FromRedisValue;

use super::server::poll_until;
use super::HarnessError;

/// For connecting and for each reply: generous on a loaded machine, yet a paused
/// server costs the checks little.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs `args` (a command and its arguments) on the server at `addr` over a new
/// connection, and converts the reply.
pub(super) fn query<T: FromRedisValue>(addr: SocketAddr, args: &[&str]) -> Result<T, HarnessError> {
    let error = |source| HarnessError::Command {
        addr,
        command: args.join(" "),
        source,
    };
    let client = redis::Client::open(format!("redis://{addr}")).map_err(error)?;
    let mut connection = client
        .get_connection_with_timeout(COMMAND_TIMEOUT)
        .map_err(error)?;
    connection
        .set_read_timeout(Some(COMMAND_TIMEOUT))
        .map_err(error)?;
    connection
        .set_write_timeout(Some(COMMAND_TIMEOUT))
        .map_err(error)?;
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    command.query(&mut connection).map_err(error)
}

/// A reply to `args` from `addr` that the fixture cannot use, e.g. an unreadable
/// line of `CLUSTER NODES`, as a [`HarnessError::Command`].
pub(super) fn unexpected(addr: SocketAddr, args: &[&str], detail: String) -> HarnessError {
    HarnessError::Command {
        addr,
        command: args.join(" "),
        source: redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "unexpected reply",
            detail,
        )),
    }
}

/// The value of `field` in an `INFO`-style reply (`field:value` lines), e.g.
/// `cluster_state` in `CLUSTER INFO` or `master_link_status` in `INFO replication`.
pub(super) fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        (name == field).then(|| value.trim())
    })
}

/// Calls `probe` with growing pauses until it returns `Ok`, for at most `timeout`.
///
/// A probe says what is still missing in its `Err`; on timeout, the last of these
/// is the [`HarnessError::Timeout`]'s `missing`.
pub(super) fn wait_for<T>(
    fixture: &'static str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> Result<T, HarnessError> {
    let mut missing = String::from("no check completed");
    poll_until(timeout, || match probe() {
        Ok(value) => Some(value),
        Err(what) => {
            missing = what;
            None
        }
    })
    .ok_or(HarnessError::Timeout {
        fixture,
        waited: timeout,
        missing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_field_reads_one_line_of_an_info_reply() {
        let info =
            "# Replication\r\nrole:slave\r\nmaster_link_status:up\r\nslave_repl_offset:14\r\n";
        assert_eq!(info_field(info, "master_link_status"), Some("up"));
        assert_eq!(info_field(info, "role"), Some("slave"));
        assert_eq!(info_field(info, "master"), None);
    }

    #[test]
    fn wait_for_reports_what_was_last_missing() {
        let mut calls = 0;
        let result: Result<(), _> = wait_for("Fixture", Duration::from_millis(30), || {
            calls += 1;
            Err(format!("check {calls}"))
        });
        match result {
            Err(HarnessError::Timeout {
                fixture, missing, ..
            }) => {
                assert_eq!(fixture, "Fixture");
                assert_eq!(missing, format!("check {calls}"));
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
    }
}
