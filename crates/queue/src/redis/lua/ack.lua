-- Completes deliveries; with a result, stores it by correlation id (SET PX), wakes its
-- waiters and appends it to the message's reply_to queue. The acks of one queue are applied
-- with one command of each kind, whatever their number.
-- ARGV: prefix, then 7 values per ack: queue, entry id, token, has result ("1"/"0"), result,
-- result TTL (ms), id of the reply message.
-- Returns one integer per ack: 1 acked, 0 lease lost.
local now = now_ms()
local out = {}
local by_queue, queues = {}, {}
for i = 2, #ARGV, 7 do
  local q = ARGV[i]
  if not by_queue[q] then
    by_queue[q] = {}
    queues[#queues + 1] = q
  end
  table.insert(by_queue[q], i)
end
for _, q in ipairs(queues) do
  local s = qkey('q', q)
  local at = by_queue[q]
  local ids = {}
  for j, i in ipairs(at) do
    ids[j] = ARGV[i + 1]
  end
  local leases = hmget_chunked(qkey('lease', q), ids)
  local done, failed_before, seen = {}, {}, {}
  for j, i in ipairs(at) do
    local id = ids[j]
    local l = parse_lease(leases[j])
    if l and l.token == ARGV[i + 2] and l.expires > now and not seen[id] then
      seen[id] = true
      done[#done + 1] = id
      if l.attempt > 1 then
        failed_before[#failed_before + 1] = id
      end
      if ARGV[i + 3] == '1' then
        local e = redis.call('XRANGE', s, id, id)
        if #e == 1 then
          local f = fields_of(e[1][2])
          local result, ttl = ARGV[i + 4], ARGV[i + 5]
          if f['c'] ~= '' then
            redis.call('SET', P .. ':result:' .. f['c'], result, 'PX', ttl)
            local ready = P .. ':result-ready:' .. f['c']
            redis.call('XADD', ready, 'MAXLEN', '1', '*', 'r', '1')
            redis.call('PEXPIRE', ready, ttl)
          end
          if f['r'] then
            append(f['r'], ARGV[i + 6], f['c'], nil, result, nil)
          end
        end
      end
      out[(i - 2) / 7 + 1] = 1
    else
      out[(i - 2) / 7 + 1] = 0
    end
  end
  if #done > 0 then
    call_chunked({'HDEL', qkey('lease', q)}, done, 1)
    call_chunked({'ZREM', qkey('leases', q)}, done, 1)
    call_chunked({'XACK', s, GROUP}, done, 1)
    call_chunked({'XDEL', s}, done, 1)
    call_chunked({'HDEL', qkey('fails', q)}, failed_before, 1)
  end
end
return out
