//! The Lua scripts, in one place. They run by `EVALSHA`, falling back to loading
//! the script when the server answers `NOSCRIPT` (after a restart or `SCRIPT FLUSH`).

use std::sync::LazyLock;

use redis::Script;

/// Deletes the key only if it still holds our token; returns 1 if deleted, else 0.
/// A plain `DEL` could delete another owner's lock after ours expired.
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"if redis.call("GET", KEYS[1]) == ARGV[1] then
    return redis.call("DEL", KEYS[1])
end
return 0"#,
    )
});

/// Every script, for `prepare()`.
pub(crate) fn all() -> [&'static Script; 1] {
    [&RELEASE]
}
