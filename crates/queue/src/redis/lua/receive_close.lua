-- Closes the lease a receive opened, after its XREADGROUP: a lease that holds nothing is
-- forgotten (with the stream of a queue no one submitted to); new entries read on top of
-- claimed ones beyond `max` are handed back (ready again at once, no attempt counted).
-- ARGV: prefix, queue, lease name, max, whether the lease may be fresh ("1"; not when this
-- step is run again after a read that ran without it: the lease then holds two reads).
-- Returns {1, handed-back entry ids...} when the lease holds entries, else {0, the next lease
-- expiry or retry time ("" if none), the queue stream's and the wake stream's last ids} for
-- the caller to block on.
local q, name, max, may_be_fresh = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5] == '1'
local s = qkey('q', q)
local first = held_ids(q, name, '-', '+', 1)
if #first == 1 then
  local out = {1}
  local claimed = holder_of(q, name).claimed
  if claimed == 0 then
    if may_be_fresh then
      -- Only new entries: the lease holds every entry from its first to the group's last
      -- delivered id (this MULTI's XREADGROUP read them).
      for _, g in ipairs(redis.call('XINFO', 'GROUPS', s)) do
        local info = fields_of(g)
        if info['name'] == GROUP then
          redis.call('HSET', qkey('fresh', q), name, first[1] .. ' ' .. info['last-delivered-id'])
        end
      end
    end
  else
    local ids = held_ids(q, name, '-', '+', max + claimed)
    for i = max + 1, #ids do
      park(q, ids[i], 0)
      out[#out + 1] = ids[i]
    end
    if #ids > max then
      wake(q)
    end
  end
  return out
end
forget_lease(q, name)
if redis.call('SISMEMBER', P .. ':queues', q) == 0 and redis.call('XLEN', s) == 0 then
  redis.call('DEL', s)
end
local out = {0, '', '0-0', '0-0'}
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
  out[2] = fmt(next_due)
end
local last = redis.call('XREVRANGE', s, '+', '-', 'COUNT', 1)
if #last == 1 then
  out[3] = last[1][1]
end
last = redis.call('XREVRANGE', qkey('wake', q), '+', '-', 'COUNT', 1)
if #last == 1 then
  out[4] = last[1][1]
end
return out
