-- Shared by every function of the library: key names, the clock, leases, failed attempts
-- and dead letters. ARGV[1] is always the key prefix.
--
-- Keys are built here instead of being passed in KEYS because some depend on stored data (a
-- message's reply_to queue, a dead letter's index): this needs a standalone (or replicated)
-- Redis, not Redis Cluster.

-- The key prefix, ARGV[1] of every call (each function sets it first: see library.rs).
local P = ARGV[1]
-- The one consumer group of every queue stream, and the one group consumer that reads for all
-- agentmesh consumers: who holds a message is in the lease record, so the group does not
-- collect one consumer per agentmesh consumer id.
local GROUP = 'agentmesh'
local READER = 'agentmesh'
-- Most entries a single Redis command gets from a function (Lua's unpack limit is ~8000 values).
local CHUNK = 1000

local function qkey(kind, q)
  return P .. ':' .. kind .. ':' .. q
end

local function fmt(n)
  return string.format('%d', n)
end

-- Redis's clock in milliseconds: every node reads the same one.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A netstring ("len:bytes"), so a history field may hold any byte.
local function ns(s)
  return fmt(#s) .. ':' .. s
end

-- The fields of a stream entry (a flat name/value list) as a table.
local function fields_of(flat)
  local f = {}
  for i = 1, #flat, 2 do
    f[flat[i]] = flat[i + 1]
  end
  return f
end

-- Calls the command `head` (a list: name, key, fixed arguments) with `items` (a flat list of
-- `width`-sized groups) appended, at most CHUNK groups a call.
local function call_chunked(head, items, width)
  local step = CHUNK * width
  for i = 1, #items, step do
    local args = {unpack(head)}
    for j = i, math.min(i + step - 1, #items) do
      args[#args + 1] = items[j]
    end
    redis.call(unpack(args))
  end
end

-- HMGET of `fields` (any number) on `key`; false for each missing field.
local function hmget_chunked(key, fields)
  local out = {}
  for i = 1, #fields, CHUNK do
    local args = {'HMGET', key}
    for j = i, math.min(i + CHUNK - 1, #fields) do
      args[#args + 1] = fields[j]
    end
    for _, v in ipairs(redis.call(unpack(args))) do
      out[#out + 1] = v
    end
  end
  return out
end

-- The stream of queue q, created with its consumer group on first use.
local function ensure_queue(q)
  local s = qkey('q', q)
  if redis.call('EXISTS', s) == 0 then
    redis.call('XGROUP', 'CREATE', s, GROUP, '0', 'MKSTREAM')
    redis.call('SADD', P .. ':queues', q)
  end
  return s
end

-- Appends a message to queue q: id m, correlation id c, reply_to r (or nil), body b and, for
-- a message enqueued before (a redriven dead letter), its first enqueue time t (or nil).
local function append(q, m, c, r, b, t)
  local args = {'XADD', ensure_queue(q), '*', 'm', m, 'c', c, 'b', b}
  if r then
    args[#args + 1] = 'r'
    args[#args + 1] = r
  end
  if t then
    args[#args + 1] = 't'
    args[#args + 1] = t
  end
  return redis.call(unpack(args))
end

-- Wakes receives waiting on q although nothing was appended (a message is ready again).
local function wake(q)
  redis.call('XADD', qkey('wake', q), 'MAXLEN', '1', '*', 'w', '1')
end

-- Leases. Each receive opens one lease, named by a fresh token: the group consumer
-- 'L<name>' holds its entries in the group's pending entries list, `leases` holds its expiry
-- and `holders` who took it and when ("delivered-ms consumer"). An entry extended on its own
-- moves to a lease of its own named '<token>/<entry id>', so a receipt (entry, token) names
-- at most two leases. Entries waiting for a retry are held by the consumer PARKED.
local PARKED = 'parked'
-- More than one lease can hold (MAX_RECEIVE_BATCH is 4096).
local MAX_HELD = 5000

local function owner(name)
  return 'L' .. name
end

-- The ids of q's pending entries in [first, last] held by lease `name` (at most `count`).
local function held_ids(q, name, first, last, count)
  local out = {}
  for _, p in ipairs(redis.call('XPENDING', qkey('q', q), GROUP, first, last, count, owner(name))) do
    out[#out + 1] = p[1]
  end
  return out
end

-- The lease that holds entry id under receipt token `token`, lapsed or not (nil for none).
local function lease_name(q, id, token)
  if #held_ids(q, token, id, id, 1) == 1 then
    return token
  end
  local own = token .. '/' .. id
  if #held_ids(q, own, id, id, 1) == 1 then
    return own
  end
  return nil
end

-- Whether lease `name` of q has not lapsed at `now`.
local function lease_live(q, name, now)
  local exp = redis.call('ZSCORE', qkey('leases', q), name)
  return exp ~= false and exp ~= nil and tonumber(exp) > now
end

-- The live lease that holds entry id under receipt token `token` (nil for none).
local function live_lease(q, id, token, now)
  local name = lease_name(q, id, token)
  if name and lease_live(q, name, now) then
    return name
  end
  return nil
end

-- A `holders` record: when the lease was taken, how many of its entries were claimed retries
-- (the rest were new), and by which consumer.
local function holder_record(delivered, claimed, consumer)
  return fmt(delivered) .. ' ' .. fmt(claimed) .. ' ' .. consumer
end

local function holder_of(q, name)
  local v = redis.call('HGET', qkey('holders', q), name)
  local delivered, claimed, consumer = string.match(v or '', '^(%d+) (%d+) (.*)$')
  return {
    delivered = delivered or '0',
    claimed = tonumber(claimed or '0'),
    consumer = consumer or '',
  }
end

-- A lease that read only new entries and has had none of them taken out of it yet (no ack,
-- nack, release, extend on its own, lapse) is "fresh": `fresh` holds the span of stream ids it
-- read ("first last"). Every entry in that span is then still held by the lease, so its first
-- ack needs no XPENDING of its entries (see ack.lua). Whatever takes an entry out of a lease
-- ends its freshness first.
local function unfresh(q, name)
  redis.call('HDEL', qkey('fresh', q), name)
end

local function forget_lease(q, name)
  redis.call('XGROUP', 'DELCONSUMER', qkey('q', q), GROUP, owner(name))
  redis.call('ZREM', qkey('leases', q), name)
  redis.call('HDEL', qkey('holders', q), name)
  unfresh(q, name)
end

-- Whether stream id a sorts at or before stream id b.
local function id_le(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if not am or not bm then
    return false
  end
  am, bm = tonumber(am), tonumber(bm)
  return am < bm or (am == bm and tonumber(as) <= tonumber(bs))
end

-- Forgets lease `name` of q once it holds no entry.
local function forget_lease_if_empty(q, name)
  if #held_ids(q, name, '-', '+', 1) == 0 then
    forget_lease(q, name)
  end
end

-- Moves entry id of q out of its lease to wait in `retry` until `at`.
local function park(q, id, at)
  redis.call('XCLAIM', qkey('q', q), GROUP, PARKED, 0, id, 'JUSTID')
  redis.call('ZADD', qkey('retry', q), at, id)
end

-- Failed attempts so far of entry id of q, and their history.
local function failures(q, id)
  local prev = redis.call('HGET', qkey('fails', q), id)
  if not prev then
    return 0, ''
  end
  local n, hist = string.match(prev, '^(%d+)\n(.*)$')
  return tonumber(n), hist
end

-- Takes entry id out of q's stream and group (acked or dead-lettered), with its history.
local function remove_entry(q, id)
  local s = qkey('q', q)
  redis.call('XACK', s, GROUP, id)
  redis.call('XDEL', s, id)
  redis.call('HDEL', qkey('fails', q), id)
end

-- Drops dead letter `did` from the message-id index of q's dead letters.
local function unindex_dead(q, m, did)
  local ix = qkey('dlx', q)
  local v = redis.call('HGET', ix, m)
  if not v then
    return
  end
  local rest = {}
  for d in string.gmatch(v, '%S+') do
    if d ~= did then
      rest[#rest + 1] = d
    end
  end
  if #rest == 0 then
    redis.call('HDEL', ix, m)
  else
    redis.call('HSET', ix, m, table.concat(rest, ' '))
  end
end

-- Moves entry id of q to q's dead letters with its last error and attempt history.
local function dead_letter(q, id, err, hist)
  local e = redis.call('XRANGE', qkey('q', q), id, id)
  if #e == 1 then
    local f = fields_of(e[1][2])
    local t = f['t'] or string.match(id, '^(%d+)')
    local args = {'XADD', qkey('dlq', q), '*', 'm', f['m'], 'c', f['c'], 'b', f['b'], 't', t,
      'e', err, 'h', hist}
    if f['r'] then
      args[#args + 1] = 'r'
      args[#args + 1] = f['r']
    end
    local did = redis.call(unpack(args))
    local ix = qkey('dlx', q)
    local prev = redis.call('HGET', ix, f['m'])
    if prev then
      redis.call('HSET', ix, f['m'], prev .. ' ' .. did)
    else
      redis.call('HSET', ix, f['m'], did)
    end
  end
  remove_entry(q, id)
end

-- Records the failed attempt of entry id held by lease `name` (the entry leaves the lease): a
-- retry at now + delay, or, on its last attempt, a dead letter. Returns the retry time, or -1
-- when dead-lettered. The history ("count\n" then four netstrings per attempt: attempt,
-- delivered at, consumer, error) is what a dead letter shows.
local function fail_attempt(q, id, name, err, delay, max_attempts, now)
  unfresh(q, name)
  local failed, hist = failures(q, id)
  local attempt = failed + 1
  local holder = holder_of(q, name)
  hist = hist .. ns(fmt(attempt)) .. ns(holder.delivered) .. ns(holder.consumer) .. ns(err)
  if attempt >= max_attempts then
    dead_letter(q, id, err, hist)
    return -1
  end
  redis.call('HSET', qkey('fails', q), id, fmt(attempt) .. '\n' .. hist)
  local at = now + delay
  park(q, id, at)
  if delay <= 0 then
    wake(q)
  end
  return at
end

-- Lapses up to `limit` leases of q whose time is up: each entry they hold a failed attempt
-- ("lease expired"), ready again at once or dead-lettered on its last attempt.
local function lapse_leases(q, max_attempts, now, limit)
  local names = redis.call('ZRANGEBYSCORE', qkey('leases', q), '-inf', now, 'LIMIT', 0, limit)
  for _, name in ipairs(names) do
    for _, id in ipairs(held_ids(q, name, '-', '+', MAX_HELD)) do
      fail_attempt(q, id, name, 'lease expired', 0, max_attempts, now)
    end
    forget_lease(q, name)
  end
end
