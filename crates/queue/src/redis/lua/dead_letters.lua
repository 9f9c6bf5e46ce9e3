-- Redrives (back to the queue's tail with a fresh attempt count) or purges dead letters.
-- ARGV: prefix, queue, "redrive" or "purge", limit, then message ids (none: the oldest
-- `limit` dead letters).
-- Returns {-1} for an unknown queue, else {how many, 1 if more may remain}.
local q, mode, limit = ARGV[2], ARGV[3], tonumber(ARGV[4])
if redis.call('SISMEMBER', P .. ':queues', q) == 0 then
  return {-1, 0}
end
local dk = qkey('dlq', q)
local n = 0
local function take(e)
  local f = fields_of(e[2])
  if mode == 'redrive' then
    append(q, f['m'], f['c'], f['r'], f['b'], f['t'])
  end
  redis.call('XDEL', dk, e[1])
  unindex_dead(q, f['m'], e[1])
  n = n + 1
end
if #ARGV == 4 then
  local es = redis.call('XRANGE', dk, '-', '+', 'COUNT', limit)
  for _, e in ipairs(es) do
    take(e)
  end
  if #es == limit then
    return {n, 1}
  end
  return {n, 0}
end
for i = 5, #ARGV do
  local v = redis.call('HGET', qkey('dlx', q), ARGV[i])
  if v then
    for did in string.gmatch(v, '%S+') do
      local es = redis.call('XRANGE', dk, did, did)
      if #es == 1 then
        take(es[1])
      end
    end
  end
end
return {n, 0}
