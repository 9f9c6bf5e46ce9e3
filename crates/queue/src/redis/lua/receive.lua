-- Leases up to `max` ready messages of one queue: lapsed leases are failed first, then due
-- retries (and released messages) are claimed, then new entries read through the group.
-- ARGV: prefix, queue, consumer id, max, lease (ms), max attempts.
-- Returns now, lease expiry, next due time ("" if none), the queue stream's and the wake
-- stream's last ids (to block on when nothing was ready), then 4 values per delivery: entry
-- id, token, attempt, fields.
local q, consumer = ARGV[2], ARGV[3]
local max, lease_ms, max_attempts = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local now = now_ms()
local exp = now + lease_ms
local s = qkey('q', q)
local entries = {}
local claimed = 0
if redis.call('EXISTS', s) == 1 then
  lapse_leases(q, max_attempts, now, CHUNK)
  local rk = qkey('retry', q)
  local due = redis.call('ZRANGEBYSCORE', rk, '-inf', now, 'LIMIT', 0, max)
  if #due > 0 then
    call_chunked({'ZREM', rk}, due, 1)
    for i = 1, #due, CHUNK do
      local args = {'XCLAIM', s, GROUP, READER, '0'}
      for j = i, math.min(i + CHUNK - 1, #due) do
        args[#args + 1] = due[j]
      end
      for _, e in ipairs(redis.call(unpack(args))) do
        if e and e[2] then
          entries[#entries + 1] = e
        end
      end
    end
  end
  -- Only claimed entries can have failed before; new ones are on their first attempt.
  claimed = #entries
  if #entries < max then
    local r = redis.call('XREADGROUP', 'GROUP', GROUP, READER, 'COUNT', max - #entries,
      'STREAMS', s, '>')
    if r then
      for _, e in ipairs(r[1][2]) do
        entries[#entries + 1] = e
      end
    end
  end
end
local out = {fmt(now), fmt(exp), '', '0-0', '0-0'}
local n = #entries
if n == 0 then
  local next_due = nil
  for _, kind in ipairs({'leases', 'retry'}) do
    local first = redis.call('ZRANGE', qkey(kind, q), 0, 0, 'WITHSCORES')
    if #first == 2 then
      local at = tonumber(first[2])
      if next_due == nil or at < next_due then
        next_due = at
      end
    end
  end
  if next_due then
    out[3] = fmt(next_due)
  end
  local last = redis.call('XREVRANGE', s, '+', '-', 'COUNT', 1)
  if #last == 1 then
    out[4] = last[1][1]
  end
  last = redis.call('XREVRANGE', qkey('wake', q), '+', '-', 'COUNT', 1)
  if #last == 1 then
    out[5] = last[1][1]
  end
  return out
end
local ids = {}
for i = 1, claimed do
  ids[i] = entries[i][1]
end
local fails = hmget_chunked(qkey('fails', q), ids)
local base = redis.call('INCRBY', P .. ':tokens', n) - n
local records, expiries = {}, {}
for i, e in ipairs(entries) do
  local attempt = 1
  if fails[i] then
    attempt = tonumber(string.match(fails[i], '^(%d+)')) + 1
  end
  local token = fmt(base + i)
  records[#records + 1] = e[1]
  records[#records + 1] = encode_lease(token, exp, now, attempt, consumer)
  expiries[#expiries + 1] = exp
  expiries[#expiries + 1] = e[1]
  out[#out + 1] = e[1]
  out[#out + 1] = token
  out[#out + 1] = fmt(attempt)
  out[#out + 1] = e[2]
end
call_chunked({'HSET', qkey('lease', q)}, records, 2)
call_chunked({'ZADD', qkey('leases', q)}, expiries, 2)
return out
