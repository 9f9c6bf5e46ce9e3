-- Completes deliveries; with a result, stores it by correlation id (SET PX), wakes its
-- waiters and appends it to the message's reply_to queue. The caller groups acks by lease, so
-- each group is checked with one XPENDING over the span of its entries, and applied with one
-- command of each kind per queue: per-ack work in Lua is what an ack costs most.
-- The first ack of a fresh lease (see `unfresh` in the prelude) whose entries all lie in the
-- span it read needs no XPENDING: each of them is still held, unless it is not an entry at all.
-- ARGV: prefix, then per group: queue, token, first entry id, last entry id, n, the n entry
-- ids, m, and m times (index in the group from 1, result, result TTL (ms), reply
-- message id).
-- Returns, per group in order, one integer per entry: 1 acked, 0 lease lost.
local now = now_ms()
local out = {}
-- Per queue: entries to XACK and XDEL (`done`), entries already XACKed to XDEL (`gone`).
local done_by_queue, gone_by_queue, queues, touched = {}, {}, {}, {}
local i = 2
while i <= #ARGV do
  local q, token, first, last = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local n = tonumber(ARGV[i + 4])
  local ids = i + 5
  local m = tonumber(ARGV[ids + n])
  local results = ids + n + 1
  i = results + 4 * m
  local s = qkey('q', q)
  local done = done_by_queue[q]
  if not done then
    done = {}
    done_by_queue[q] = done
    gone_by_queue[q] = {}
    queues[#queues + 1] = q
  end
  local base = #out
  local live = lease_live(q, token, now)
  local fresh = live and redis.call('HGET', qkey('fresh', q), token)
  local lo, hi = string.match(fresh or '', '^(%S+) (%S+)$')
  if lo then
    unfresh(q, token)
  end
  local fast = lo ~= nil and id_le(lo, first) and id_le(last, hi)
  if fast then
    local acked = 0
    for k = ids, ids + n - 1, CHUNK do
      acked = acked + redis.call('XACK', s, GROUP, unpack(ARGV, k, math.min(k + CHUNK - 1, ids + n - 1)))
    end
    local gone = gone_by_queue[q]
    if acked == n then
      for j = 0, n - 1 do
        gone[#gone + 1] = ARGV[ids + j]
        out[base + j + 1] = 1
      end
    else
      -- Some ids name no entry (they were never handed out), or one entry twice.
      local seen = {}
      for j = 0, n - 1 do
        local id = ARGV[ids + j]
        if not seen[id] and #redis.call('XRANGE', s, id, id) == 1 then
          gone[#gone + 1] = id
          out[base + j + 1] = 1
        else
          out[base + j + 1] = 0
        end
        seen[id] = true
      end
    end
    touched[#touched + 1] = {q, token}
  end
  -- The entries the lease still holds over the span of the acks.
  local held = {}
  if live and not fast then
    for _, p in ipairs(redis.call('XPENDING', s, GROUP, first, last, MAX_HELD, owner(token))) do
      held[p[1]] = true
    end
    touched[#touched + 1] = {q, token}
  end
  for j = 0, fast and -1 or n - 1 do
    local id = ARGV[ids + j]
    local ok = held[id]
    if ok == nil then
      -- Not in the lease: extended on its own, or lost.
      local name = live_lease(q, id, token, now)
      if name then
        ok = true
        touched[#touched + 1] = {q, name}
      end
    end
    if ok then
      -- A second ack of the same entry in this call is lost.
      held[id] = false
      done[#done + 1] = id
      out[base + j + 1] = 1
    else
      out[base + j + 1] = 0
    end
  end
  for k = results, results + 4 * (m - 1), 4 do
    local j = tonumber(ARGV[k])
    if out[base + j] == 1 then
      local e = redis.call('XRANGE', s, ARGV[ids + j - 1], ARGV[ids + j - 1])
      if #e == 1 then
        local f = fields_of(e[1][2])
        local result, ttl = ARGV[k + 1], ARGV[k + 2]
        if f['c'] ~= '' then
          redis.call('SET', P .. ':result:' .. f['c'], result, 'PX', ttl)
          local ready = P .. ':result-ready:' .. f['c']
          redis.call('XADD', ready, 'MAXLEN', '1', '*', 'r', '1')
          redis.call('PEXPIRE', ready, ttl)
        end
        if f['r'] then
          append(f['r'], ARGV[k + 3], f['c'], nil, result, nil)
        end
      end
    end
  end
end
for _, q in ipairs(queues) do
  local done, gone = done_by_queue[q], gone_by_queue[q]
  local s = qkey('q', q)
  if #done > 0 then
    call_chunked({'XACK', s, GROUP}, done, 1)
    call_chunked({'XDEL', s}, done, 1)
    if redis.call('EXISTS', qkey('fails', q)) == 1 then
      call_chunked({'HDEL', qkey('fails', q)}, done, 1)
    end
  end
  -- Entries of fresh leases were never retried: no `fails` records.
  if #gone > 0 then
    call_chunked({'XDEL', s}, gone, 1)
  end
end
for _, t in ipairs(touched) do
  forget_lease_if_empty(t[1], t[2])
end
return out
