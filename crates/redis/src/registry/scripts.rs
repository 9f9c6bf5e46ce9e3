//! The registry's Lua scripts: each change is one script, so it is atomic, numbered (the
//! version counter) and announced on the change channel in the same step. Every script
//! takes the registry's keys in the order of [`Keys::registry`](crate::keys::Keys) —
//! instances, leases, expiries, version — and the channel as `ARGV[1]`. Times are Redis's
//! own clock (`TIME`), so the nodes' clocks do not matter; what leaves a script is the
//! time left on a lease, not a date.

use std::sync::LazyLock;

use redis::Script;

/// `ARGV`: channel, instance id, lease id, TTL ms, record. Replaces any earlier lease of
/// the instance. Returns the announced change.
pub(crate) static REGISTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local previous = redis.call('HGET', KEYS[1], ARGV[2])
if previous then
  redis.call('HDEL', KEYS[2], string.match(previous, '^(%S+)'))
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[5])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[2])
local version = redis.call('INCR', KEYS[4])
local kind = 'A'
if previous then kind = 'U' end
local change = kind .. ' ' .. version .. ' ' .. ARGV[4] .. ' ' .. ARGV[5]
redis.call('PUBLISH', ARGV[1], change)
return change
"#,
    )
});

/// `ARGV`: channel, lease id. Pushes the lease's expiry one TTL from now. Returns the
/// announced change, or nil for a lease that is unknown or already lapsed.
pub(crate) static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local id = redis.call('HGET', KEYS[2], ARGV[2])
if not id then return false end
local record = redis.call('HGET', KEYS[1], id)
local expiry = redis.call('ZSCORE', KEYS[3], id)
if not record or not expiry then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(expiry) <= now then return false end
local ttl = string.match(record, '^%S+ (%d+) ')
redis.call('ZADD', KEYS[3], now + tonumber(ttl), id)
local version = redis.call('INCR', KEYS[4])
local change = 'R ' .. version .. ' ' .. ttl .. ' ' .. id
redis.call('PUBLISH', ARGV[1], change)
return change
"#,
    )
});

/// `ARGV`: channel, lease id. Removes the lease's instance. Returns the announced change,
/// or nil for an unknown lease.
pub(crate) static DEREGISTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local id = redis.call('HGET', KEYS[2], ARGV[2])
if not id then return false end
redis.call('HDEL', KEYS[2], ARGV[2])
local record = redis.call('HGET', KEYS[1], id)
redis.call('HDEL', KEYS[1], id)
redis.call('ZREM', KEYS[3], id)
if not record then return false end
local version = redis.call('INCR', KEYS[4])
local change = 'D ' .. version .. ' 0 ' .. record
redis.call('PUBLISH', ARGV[1], change)
return change
"#,
    )
});

/// `ARGV`: channel, most instances to remove. Removes instances whose lease has lapsed by
/// Redis's clock — a heartbeat through any node moved the expiry, so only what really
/// lapsed goes. Returns `{ms until the next expiry or -1 if none, {changes…}}`.
pub(crate) static REAP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local changes = {}
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[3], id)
  local record = redis.call('HGET', KEYS[1], id)
  if record then
    redis.call('HDEL', KEYS[1], id)
    redis.call('HDEL', KEYS[2], string.match(record, '^(%S+)'))
    local version = redis.call('INCR', KEYS[4])
    local change = 'E ' .. version .. ' 0 ' .. record
    redis.call('PUBLISH', ARGV[1], change)
    table.insert(changes, change)
  end
end
local next = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
local wait = -1
if next[2] then wait = math.max(tonumber(next[2]) - now, 0) end
return {wait, changes}
"#,
    )
});

/// Everything at once: `{version, now ms, {id, record, …}, {id, expiry ms, …}}`.
pub(crate) static SNAPSHOT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local version = tonumber(redis.call('GET', KEYS[4]) or '0')
return {version, now, redis.call('HGETALL', KEYS[1]),
  redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')}
"#,
    )
});
