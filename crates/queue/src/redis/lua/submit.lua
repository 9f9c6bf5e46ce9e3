-- Appends a batch to one queue, suppressing duplicates by idempotency key in the same atomic
-- step (a duplicate is never appended).
-- ARGV: prefix, queue, dedup window (ms), then 6 values per message: id, has key ("1"/"0"),
-- idempotency key, correlation id, reply_to ("" for none), body.
-- Returns 2 values per message: "a" and the stream entry id, or "d" and the earlier id.
local q, window = ARGV[2], ARGV[3]
ensure_queue(q)
local dedup = P .. ':dedup:' .. fmt(#q) .. ':' .. q .. ':'
local out = {}
for i = 4, #ARGV, 6 do
  local id = ARGV[i]
  local earlier = nil
  if ARGV[i + 1] == '1' then
    local dk = dedup .. ARGV[i + 2]
    if not redis.call('SET', dk, id, 'NX', 'PX', window) then
      earlier = redis.call('GET', dk)
    end
  end
  if earlier then
    out[#out + 1] = 'd'
    out[#out + 1] = earlier
  else
    local r = ARGV[i + 4]
    if r == '' then
      r = nil
    end
    out[#out + 1] = 'a'
    out[#out + 1] = append(q, id, ARGV[i + 3], r, ARGV[i + 5], nil)
  end
end
return out
