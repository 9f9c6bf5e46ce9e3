-- Hands leases back without a failed attempt: each message is ready again at once.
-- ARGV: prefix, then 3 values per lease: queue, entry id, token.
-- Returns how many leases were still held (stale ones are ignored).
local released = 0
local woken = {}
for i = 2, #ARGV, 3 do
  local q, id = ARGV[i], ARGV[i + 1]
  local l = lease_of(q, id)
  if l and l.token == ARGV[i + 2] then
    end_lease(q, id)
    redis.call('ZADD', qkey('retry', q), 0, id)
    released = released + 1
    if not woken[q] then
      wake(q)
      woken[q] = true
    end
  end
end
return released
