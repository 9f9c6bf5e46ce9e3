-- Counters of queues, after lapsing their expired leases.
-- ARGV: prefix, then 2 values per queue: name, max attempts.
-- Returns 4 integers per queue: depth, in flight, dead letters, oldest age (ms; -1 if empty).
local now = now_ms()
local out = {}
for i = 2, #ARGV, 2 do
  local q = ARGV[i]
  local s = qkey('q', q)
  local in_flight = 0
  local age = -1
  if redis.call('EXISTS', s) == 1 then
    lapse_leases(q, tonumber(ARGV[i + 1]), now, CHUNK)
    -- Pending entries are leased or parked (waiting in `retry`).
    in_flight = redis.call('XPENDING', s, GROUP)[1] - redis.call('ZCARD', qkey('retry', q))
    local first = redis.call('XRANGE', s, '-', '+', 'COUNT', 1)
    if #first == 1 then
      local t = fields_of(first[1][2])['t'] or string.match(first[1][1], '^(%d+)')
      age = math.max(0, now - tonumber(t))
    end
  end
  out[#out + 1] = redis.call('XLEN', s) - in_flight
  out[#out + 1] = in_flight
  out[#out + 1] = redis.call('XLEN', qkey('dlq', q))
  out[#out + 1] = age
end
return out
