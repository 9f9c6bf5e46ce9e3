-- Opens the lease of one receive: lapses the queue's expired leases, then claims due retries
-- (and released messages) for the new lease. The caller reads new entries for the same lease
-- with XREADGROUP right after, in the same MULTI, and `receive_close` ends the step: new
-- entries never pass through Lua, which costs more than reading them.
-- ARGV: prefix, queue, lease name, consumer id, max, lease (ms), max attempts.
-- Returns now, lease expiry, then 3 values per claimed delivery: entry id, attempt, fields.
local q, name, consumer = ARGV[2], ARGV[3], ARGV[4]
local max, lease_ms, max_attempts = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local now = now_ms()
local exp = now + lease_ms
local s = qkey('q', q)
if redis.call('EXISTS', s) == 0 then
  -- XREADGROUP needs the stream and its group; receive_close deletes an unknown queue's again.
  redis.call('XGROUP', 'CREATE', s, GROUP, '0', 'MKSTREAM')
end
lapse_leases(q, max_attempts, now, CHUNK)
local out = {fmt(now), fmt(exp)}
local rk = qkey('retry', q)
local due = redis.call('ZRANGEBYSCORE', rk, '-inf', now, 'LIMIT', 0, max)
local entries = {}
if #due > 0 then
  call_chunked({'ZREM', rk}, due, 1)
  for i = 1, #due, CHUNK do
    local args = {'XCLAIM', s, GROUP, owner(name), '0'}
    for j = i, math.min(i + CHUNK - 1, #due) do
      args[#args + 1] = due[j]
    end
    for _, e in ipairs(redis.call(unpack(args))) do
      if e and e[2] then
        entries[#entries + 1] = e
      end
    end
  end
  local ids = {}
  for i, e in ipairs(entries) do
    ids[i] = e[1]
  end
  local fails = hmget_chunked(qkey('fails', q), ids)
  for i, e in ipairs(entries) do
    local attempt = 1
    if fails[i] then
      attempt = tonumber(string.match(fails[i], '^(%d+)')) + 1
    end
    out[#out + 1] = e[1]
    out[#out + 1] = fmt(attempt)
    out[#out + 1] = e[2]
  end
end
redis.call('ZADD', qkey('leases', q), exp, name)
redis.call('HSET', qkey('holders', q), name, holder_record(now, #entries, consumer))
return out
