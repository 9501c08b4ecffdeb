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

/// `SET NX PX`; or, where the key already holds a value with our token (ARGV[3],
/// followed by a space, the nonce and any metadata), our new value with the new
/// TTL: a process that chose its own token takes back the lock it held before a
/// restart. Returns 1 if the key now holds our value, else 0.
pub(crate) static RETAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"if redis.call("SET", KEYS[1], ARGV[1], "NX", "PX", ARGV[2]) then
    return 1
end
local held = redis.call("GET", KEYS[1])
if string.sub(held, 1, #ARGV[3] + 1) == ARGV[3] .. " " then
    redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2])
    return 1
end
return 0"#,
    )
});

/// Every script, for `prepare()`.
pub(crate) fn all() -> [&'static Script; 3] {
    [&RELEASE, &EXTEND, &RETAKE]
}
