//! The Lua scripts, in one place. They run by `EVALSHA`, falling back to loading
//! the script when the server answers `NOSCRIPT` (after a restart or `SCRIPT FLUSH`).

use std::ops::Deref;
use std::sync::OnceLock;

use redis::Script;

/// A script and its source: a cluster member loads a script on the one node
/// that answered `NOSCRIPT` (`SCRIPT LOAD` through a cluster client goes to every
/// node, and fails where one is down).
pub(crate) struct Lua {
    pub(crate) code: &'static str,
    script: OnceLock<Script>,
}

impl Lua {
    const fn new(code: &'static str) -> Self {
        Self {
            code,
            script: OnceLock::new(),
        }
    }
}

impl Deref for Lua {
    type Target = Script;

    fn deref(&self) -> &Script {
        self.script.get_or_init(|| Script::new(self.code))
    }
}

/// Every granting script starts with this check. Where an epoch id is given
/// (ARGV[$id]; empty for none), the epoch hash (KEYS[$key]) must hold it under
/// `id`, and where a `run_id` is given (ARGV[$run]), the server's must be it:
/// otherwise the script answers -1 and sets nothing (see `epoch`). The
/// `run_id` catches a failover to a replica that has the epoch (replicated long
/// ago) but not recent locks, behind a connection that reconnects without
/// failing a request; `INFO` costs enough that connections that do fail one
/// (see `Instance::sees_reconnects`) leave it out.
macro_rules! verified {
    ($key:literal, $id:literal, $run:literal) => {
        concat!(
            "if ARGV[", $id, "] ~= \"\" and (redis.call(\"HGET\", KEYS[", $key, "], \"id\") ~= ARGV[", $id, "]\n",
            "    or (ARGV[", $run, "] ~= \"\" and string.match(redis.call(\"INFO\", \"server\"), \"run_id:(%x+)\") ~= ARGV[", $run, "])) then\n",
            "    return -1\n",
            "end\n"
        )
    };
}

/// After a grant or extend, where the flag ARGV[$flag] is not empty (the
/// locker sets it for a TTL above what it last read there): raises the epoch
/// hash's `ttl` field (KEYS[$key]) to the TTL just set (ARGV[2]), so that every
/// locker knows how long the locks on this server can last when another server
/// loses its keys.
macro_rules! raise_ttl {
    ($key:literal, $flag:literal) => {
        concat!(
            "if ARGV[",
            $flag,
            "] ~= \"\" and (tonumber(redis.call(\"HGET\", KEYS[",
            $key,
            "], \"ttl\")) or 0) < tonumber(ARGV[2]) then\n",
            "    redis.call(\"HSET\", KEYS[",
            $key,
            "], \"ttl\", ARGV[2])\n",
            "end\n"
        )
    };
}

/// Deletes the key only if it still holds our value; returns 1 if deleted, else 0.
/// A plain `DEL` could delete another owner's lock after ours expired.
pub(crate) static RELEASE: Lua = Lua::new(
    r#"if redis.call("GET", KEYS[1]) == ARGV[1] then
    return redis.call("DEL", KEYS[1])
end
return 0"#,
);

/// Sets a new TTL (ARGV[2], milliseconds) only if the key still holds our value;
/// returns 1 if extended, else 0. Never creates the key: a lock that expired stays
/// free for whoever takes it next. With ARGV[3] not empty, raises the epoch
/// hash's `ttl` (KEYS[2]) as a grant does.
pub(crate) static EXTEND: Lua = Lua::new(concat!(
    r#"if redis.call("GET", KEYS[1]) == ARGV[1] then
"#,
    raise_ttl!(2, 3),
    r#"    return redis.call("PEXPIRE", KEYS[1], ARGV[2])
end
return 0"#
));

/// The grant of `RETAKE` and `FENCED_RETAKE`: `SET NX PX` (KEYS[1], ARGV[1],
/// ARGV[2]), or where the key holds a value with our token (ARGV[3], then a
/// space), our value in its place; opens `if granted then`, which the script
/// closes.
macro_rules! retake {
    () => {
        r#"local granted = redis.call("SET", KEYS[1], ARGV[1], "NX", "PX", ARGV[2])
if not granted then
    local held = redis.call("GET", KEYS[1])
    if string.sub(held, 1, #ARGV[3] + 1) == ARGV[3] .. " " then
        redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2])
        granted = true
    end
end
if granted then
"#
    };
}

/// `SET key value NX PX ttl` (KEYS[1], ARGV[1], ARGV[2]) where the server is
/// the one verified (epoch hash KEYS[2], id ARGV[3], `run_id` ARGV[4]; raise
/// flag ARGV[5]). Returns
/// 1 if set, 0 if refused, -1 if not the verified server. Without a check a
/// plain `SET NX PX` is sent instead.
pub(crate) static SET_CHECKED: Lua = Lua::new(concat!(
    verified!(2, 3, 4),
    r#"if redis.call("SET", KEYS[1], ARGV[1], "NX", "PX", ARGV[2]) then
"#,
    raise_ttl!(2, 5),
    r#"    return 1
end
return 0"#
));

/// `SET NX PX`; or, where the key already holds a value with our token (ARGV[3],
/// followed by a space, the nonce and any metadata), our new value with the new
/// TTL: a process that chose its own token takes back the lock it held before a
/// restart. Returns 1 if the key now holds our value, else 0; -1 if not the
/// verified server (epoch hash KEYS[2], id ARGV[4], `run_id` ARGV[5]; raise flag
/// ARGV[6]).
pub(crate) static RETAKE: Lua = Lua::new(concat!(
    verified!(2, 4, 5),
    retake!(),
    raise_ttl!(2, 6),
    r#"    return 1
end
return 0"#
));

/// As `RELEASE`, and where it deleted, also publishes ARGV[3] (the released
/// attempt's nonce) on the channel ARGV[2], so that waiters retry at once (see
/// `handoff`). Inside the script: no extra round trip, and no message for a
/// release that deleted nothing.
pub(crate) static RELEASE_PUBLISH: Lua = Lua::new(
    r#"if redis.call("GET", KEYS[1]) == ARGV[1] then
    redis.call("DEL", KEYS[1])
    redis.call("PUBLISH", ARGV[2], ARGV[3])
    return 1
end
return 0"#,
);

/// The end of a fenced grant: `INCR` of the fencing counter (KEYS[2]), which
/// must come out between 1 and 2^53 − 1. A counter someone set below zero would
/// answer 0 (read as a refusal, leaving the key just set behind) or -1 (read
/// as a changed server); one set at 2^53 or more comes back rounded, as Lua
/// holds `INCR`'s answer in a double, so that successive holders would get
/// the same token (and near 2^63 a negative one). The script fails instead,
/// and the locker rolls back the key of a failed vote.
macro_rules! fenced_counter {
    () => {
        r#"    local counter = redis.call("INCR", KEYS[2])
    if counter < 1 or counter > 9007199254740991 then
        return redis.error_reply("ERR the fencing counter " .. KEYS[2] .. " is outside 1 to 2^53 - 1")
    end
    return counter
"#
    };
}

/// The first round of a fenced attempt: `SET key value NX PX ttl` (KEYS[1],
/// ARGV[1], ARGV[2]), and only if it set the key, `INCR` the key's fencing
/// counter (KEYS[2], which never expires). Returns the counter, 0 if refused, or
/// -1 if not the verified server (epoch hash KEYS[3], id ARGV[3], `run_id`
/// ARGV[4]; raise flag ARGV[5]).
pub(crate) static FENCED_SET: Lua = Lua::new(concat!(
    verified!(3, 3, 4),
    r#"if redis.call("SET", KEYS[1], ARGV[1], "NX", "PX", ARGV[2]) then
"#,
    raise_ttl!(3, 5),
    fenced_counter!(),
    r#"end
return 0"#
));

/// `RETAKE` (ARGV[3] is the token), then `INCR` of the fencing counter KEYS[2]
/// where it granted. Returns the counter, 0 if refused, or -1 if not the
/// verified server (epoch hash KEYS[3], id ARGV[4], `run_id` ARGV[5]; raise
/// flag ARGV[6]): a re-taken lock gets a new, larger token, like any new holder.
pub(crate) static FENCED_RETAKE: Lua = Lua::new(concat!(
    verified!(3, 4, 5),
    retake!(),
    raise_ttl!(3, 6),
    fenced_counter!(),
    r#"end
return 0"#
));

/// The second round of a fenced attempt: only while the lock key (KEYS[1]) still
/// holds our value (ARGV[1]), raises the fencing counter (KEYS[2]) to the token
/// (ARGV[2]) if it is lower. Returns 1 if the key still held our value, else 0.
/// The counter only ever grows, so the write is safe to repeat.
pub(crate) static FENCE_WRITE_BACK: Lua = Lua::new(
    r#"if redis.call("GET", KEYS[1]) ~= ARGV[1] then
    return 0
end
local current = tonumber(redis.call("GET", KEYS[2]))
if current == nil or current < tonumber(ARGV[2]) then
    redis.call("SET", KEYS[2], ARGV[2])
end
return 1"#,
);

/// A cluster member's first grant in a slot: where the slot's epoch hash
/// (KEYS[1]) has no `id`, writes ARGV[1]; answers the id and the server's
/// `run_id`, so that the member can check which server holds the slot.
#[cfg(feature = "cluster")]
pub(crate) static SLOT_EPOCH: Lua = Lua::new(
    r#"redis.call("HSETNX", KEYS[1], "id", ARGV[1])
return {redis.call("HGET", KEYS[1], "id"), string.match(redis.call("INFO", "server"), "run_id:(%x+)")}"#,
);

/// Raises an epoch hash's `ttl` (KEYS[1]) to ARGV[1] milliseconds where it is
/// lower: a cluster member records a longer TTL on every primary's anchor
/// before it sends the grant or extend (the lock's own slot may be elsewhere).
#[cfg(feature = "cluster")]
pub(crate) static RAISE_TTL: Lua = Lua::new(
    r#"if (tonumber(redis.call("HGET", KEYS[1], "ttl")) or 0) < tonumber(ARGV[1]) then
    redis.call("HSET", KEYS[1], "ttl", ARGV[1])
end
return 1"#,
);

/// A Sentinel member's record of its primary, in the epoch hash (KEYS[1]):
/// the identity ARGV[1] (`run_id:master_replid`) under `primary`, and under
/// `since` the server's time in milliseconds when a probe found another
/// identity there (0 where the record was first made). Answers `since` and
/// the time now: a locker that starts after a failover learns how recent it
/// was, though it never saw the old primary.
pub(crate) static RECORD_PRIMARY: Lua = Lua::new(
    r#"local time = redis.call("TIME")
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local recorded = redis.call("HGET", KEYS[1], "primary")
if not recorded then
    redis.call("HSET", KEYS[1], "primary", ARGV[1], "since", 0)
elseif recorded ~= ARGV[1] then
    redis.call("HSET", KEYS[1], "primary", ARGV[1], "since", now)
end
return {tonumber(redis.call("HGET", KEYS[1], "since")) or 0, now}"#,
);

/// Every script, for `prepare()`.
pub(crate) fn all() -> [&'static Lua; 8] {
    [
        &SET_CHECKED,
        &RELEASE,
        &EXTEND,
        &RETAKE,
        &RELEASE_PUBLISH,
        &FENCED_SET,
        &FENCED_RETAKE,
        &FENCE_WRITE_BACK,
    ]
}
