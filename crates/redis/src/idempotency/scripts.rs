//! The idempotency key's Lua scripts. A key's value is one of
//! - `p <leader token> <node id>`: a call leads, with the lead timeout as TTL;
//! - `P <leader token> <node id>`: the same, and a duplicate is waiting (so settling it
//!   publishes a wake-up; a key nobody waits on is settled without a message);
//! - `d<Envelope protobuf>`: the remembered reply, with the window as TTL.
//!
//! Taking the lead is a plain `SET key p… NX PX <lead timeout> GET`, no script.

use std::sync::LazyLock;

use redis::Script;

/// `KEYS`: the key. Marks a pending key as waited on; returns the value (nil if none).
pub(crate) static WAIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local v = redis.call('GET', KEYS[1])
if not v then return false end
if string.sub(v, 1, 1) == 'p' then
  v = 'P' .. string.sub(v, 2)
  redis.call('SET', KEYS[1], v, 'KEEPTTL')
end
return v
"#,
    )
});

/// `KEYS`: the key. `ARGV`: leader token, reply (`d…`), window ms, wake channel, wake
/// message. Stores the reply if this leader still holds the key, or if the key has
/// lapsed meanwhile and nobody took it. Returns 1 if stored.
pub(crate) static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
local kind, token = string.match(v, '^([pP]) (%S+)')
if token ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if kind == 'P' then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
return 1
"#,
    )
});

/// `KEYS`: the key. `ARGV`: leader token, wake channel, wake message. Deletes the key if
/// this leader still holds it (it failed or went away), so a duplicate can lead.
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local kind, token = string.match(v, '^([pP]) (%S+)')
if token ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if kind == 'P' then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return 1
"#,
    )
});

/// `KEYS`: the key. `ARGV`: leader token, lead timeout ms. Extends a lead still held by
/// this leader; returns 0 once it is not (settled, lapsed, or taken).
pub(crate) static KEEP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local kind, token = string.match(v, '^([pP]) (%S+)')
if token ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#,
    )
});
