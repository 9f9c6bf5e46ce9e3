-- Extends one live lease to `lease` from now. An entry whose lease holds others too moves to
-- a lease of its own first, so the others keep their expiry.
-- ARGV: prefix, queue, entry id, token, lease (ms).
-- Returns the new expiry, or "" if the lease is lost.
local now = now_ms()
local q, id, token = ARGV[2], ARGV[3], ARGV[4]
local name = live_lease(q, id, token, now)
if not name then
  return ''
end
if name == token and #held_ids(q, token, '-', '+', 2) > 1 then
  local holder = holder_of(q, token)
  unfresh(q, token)
  name = token .. '/' .. id
  redis.call('XCLAIM', qkey('q', q), GROUP, owner(name), 0, id, 'JUSTID')
  redis.call('HSET', qkey('holders', q), name, holder_record(holder.delivered, 0, holder.consumer))
end
local exp = now + tonumber(ARGV[5])
redis.call('ZADD', qkey('leases', q), exp, name)
return fmt(exp)
