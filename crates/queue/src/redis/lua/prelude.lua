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

-- A lease record, "token expires delivered attempt consumer", read (nil for none).
local function parse_lease(v)
  if not v then
    return nil
  end
  local tok, exp, dlv, att, who = string.match(v, '^(%d+) (%d+) (%d+) (%d+) (.*)$')
  if not tok then
    return nil
  end
  return {
    token = tok,
    expires = tonumber(exp),
    delivered = tonumber(dlv),
    attempt = tonumber(att),
    consumer = who,
  }
end

-- The lease record of entry id of q.
local function lease_of(q, id)
  return parse_lease(redis.call('HGET', qkey('lease', q), id))
end

local function encode_lease(token, expires, delivered, attempt, consumer)
  return token .. ' ' .. fmt(expires) .. ' ' .. fmt(delivered) .. ' ' .. fmt(attempt) .. ' ' .. consumer
end

-- The lease of entry id if `token` still names it and it has not lapsed.
local function live_lease(q, id, token, now)
  local l = lease_of(q, id)
  if l and l.token == token and l.expires > now then
    return l
  end
  return nil
end

local function end_lease(q, id)
  redis.call('HDEL', qkey('lease', q), id)
  redis.call('ZREM', qkey('leases', q), id)
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

-- Records the failed attempt of lease l on entry id (its lease ends): a retry at now + delay,
-- or, on its last attempt, a dead letter. Returns the retry time, or -1 when dead-lettered.
-- The history ("count\n" then four netstrings per attempt) is what a dead letter shows.
local function fail_attempt(q, id, l, err, delay, max_attempts, now)
  end_lease(q, id)
  local fk = qkey('fails', q)
  local prev = redis.call('HGET', fk, id)
  local hist = ''
  if prev then
    hist = string.match(prev, '^%d+\n(.*)$') or ''
  end
  hist = hist .. ns(fmt(l.attempt)) .. ns(fmt(l.delivered)) .. ns(l.consumer) .. ns(err)
  if l.attempt >= max_attempts then
    dead_letter(q, id, err, hist)
    return -1
  end
  redis.call('HSET', fk, id, fmt(l.attempt) .. '\n' .. hist)
  local at = now + delay
  redis.call('ZADD', qkey('retry', q), at, id)
  if delay <= 0 then
    wake(q)
  end
  return at
end

-- Lapses up to `limit` leases of q whose time is up: each a failed attempt ("lease expired"),
-- ready again at once or dead-lettered on its last attempt.
local function lapse_leases(q, max_attempts, now, limit)
  local lk = qkey('leases', q)
  local ids = redis.call('ZRANGEBYSCORE', lk, '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do
    local l = lease_of(q, id)
    if l then
      fail_attempt(q, id, l, 'lease expired', 0, max_attempts, now)
    else
      redis.call('ZREM', lk, id)
    end
  end
end
