-- Extends one live lease to `lease` from now.
-- ARGV: prefix, queue, entry id, token, lease (ms).
-- Returns the new expiry, or "" if the lease is lost.
local now = now_ms()
local q, id = ARGV[2], ARGV[3]
local l = live_lease(q, id, ARGV[4], now)
if not l then
  return ''
end
local exp = now + tonumber(ARGV[5])
redis.call('HSET', qkey('lease', q), id, encode_lease(l.token, exp, l.delivered, l.attempt, l.consumer))
redis.call('ZADD', qkey('leases', q), exp, id)
return fmt(exp)
