//! The Lua scripts, in one place. They run by `EVALSHA`, falling back to loading
//! the script when the server answers `NOSCRIPT` (after a restart or `SCRIPT FLUSH`).

use std::sync::LazyLock;

use redis::Script;

/// Deletes the key only if it still holds our value; returns 1 if deleted, else 0.
/// A plain `DEL` could delete another owner's lock after ours expired.
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"if redis.call("GET", KEYS[1]) == ARGV[1] then
    return redis.call("DEL", KEYS[1])
end
return 0"#,
    )
});

/// Sets a new TTL (ARGV[2], milliseconds) only if the key still holds our value;
/// returns 1 if extended, else 0. Never creates the key: a lock that expired stays
/// free for whoever takes it next.
pub(crate) static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"if redis.call("GET", KEYS[1]) == ARGV[1] then
    return redis.call("PEXPIRE", KEYS[1], ARGV[2])
end
return 0"#,
    )
});

/// Every granting script starts with this check: where an epoch value is given
/// (its last ARGV; empty for none), the epoch key (its last KEYS) must hold it,
/// or the script answers -1 and sets nothing (see `epoch`).
macro_rules! epoch_check {
    ($keys:literal, $argv:literal) => {
        concat!(
            "if ARGV[",
            $argv,
            "] ~= \"\" and redis.call(\"GET\", KEYS[",
            $keys,
            "]) ~= ARGV[",
            $argv,
            "] then\n",
            "    return -1\n",
            "end\n"
        )
    };
}

/// `SET key value NX PX ttl` (KEYS[1], ARGV[1], ARGV[2]) where the epoch key
/// (KEYS[2]) holds the verified epoch (ARGV[3]). Returns 1 if set, 0 if
/// refused, -1 if the epoch differs. Without an epoch a plain `SET NX PX` is sent.
pub(crate) static SET_CHECKED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        epoch_check!(2, 3),
        r#"if redis.call("SET", KEYS[1], ARGV[1], "NX", "PX", ARGV[2]) then
    return 1
end
return 0"#
    ))
});

/// `SET NX PX`; or, where the key already holds a value with our token (ARGV[3],
/// followed by a space, the nonce and any metadata), our new value with the new
/// TTL: a process that chose its own token takes back the lock it held before a
/// restart. Returns 1 if the key now holds our value, else 0; -1 if the epoch
/// key (KEYS[2]) does not hold the epoch (ARGV[4]).
pub(crate) static RETAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        epoch_check!(2, 4),
        r#"if redis.call("SET", KEYS[1], ARGV[1], "NX", "PX", ARGV[2]) then
    return 1
end
local held = redis.call("GET", KEYS[1])
if string.sub(held, 1, #ARGV[3] + 1) == ARGV[3] .. " " then
    redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2])
    return 1
end
return 0"#
    ))
});

/// As `RELEASE`, and where it deleted, also publishes ARGV[3] (the released
/// attempt's nonce) on the channel ARGV[2], so that waiters retry at once (see
/// `handoff`). Inside the script: no extra round trip, and no message for a
/// release that deleted nothing.
pub(crate) static RELEASE_PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"if redis.call("GET", KEYS[1]) == ARGV[1] then
    redis.call("DEL", KEYS[1])
    redis.call("PUBLISH", ARGV[2], ARGV[3])
    return 1
end
return 0"#,
    )
});

/// The first round of a fenced attempt: `SET key value NX PX ttl` (KEYS[1],
/// ARGV[1], ARGV[2]), and only if it set the key, `INCR` the key's fencing
/// counter (KEYS[2], which never expires). Returns the counter, 0 if refused, or
/// -1 if the epoch key (KEYS[3]) does not hold the epoch (ARGV[3]).
pub(crate) static FENCED_SET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        epoch_check!(3, 3),
        r#"if redis.call("SET", KEYS[1], ARGV[1], "NX", "PX", ARGV[2]) then
    return redis.call("INCR", KEYS[2])
end
return 0"#
    ))
});

/// `RETAKE` (ARGV[3] is the token), then `INCR` of the fencing counter KEYS[2]
/// where it granted. Returns the counter, 0 if refused, or -1 if the epoch key
/// (KEYS[3]) does not hold the epoch (ARGV[4]): a re-taken lock gets a new,
/// larger token, like any new holder.
pub(crate) static FENCED_RETAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        epoch_check!(3, 4),
        r#"if redis.call("SET", KEYS[1], ARGV[1], "NX", "PX", ARGV[2]) then
    return redis.call("INCR", KEYS[2])
end
local held = redis.call("GET", KEYS[1])
if string.sub(held, 1, #ARGV[3] + 1) == ARGV[3] .. " " then
    redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2])
    return redis.call("INCR", KEYS[2])
end
return 0"#
    ))
});

/// The second round of a fenced attempt: only while the lock key (KEYS[1]) still
/// holds our value (ARGV[1]), raises the fencing counter (KEYS[2]) to the token
/// (ARGV[2]) if it is lower. Returns 1 if the key still held our value, else 0.
/// The counter only ever grows, so the write is safe to repeat.
pub(crate) static FENCE_WRITE_BACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"if redis.call("GET", KEYS[1]) ~= ARGV[1] then
    return 0
end
local current = tonumber(redis.call("GET", KEYS[2]))
if current == nil or current < tonumber(ARGV[2]) then
    redis.call("SET", KEYS[2], ARGV[2])
end
return 1"#,
    )
});

/// Every script, for `prepare()`.
pub(crate) fn all() -> [&'static Script; 8] {
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
