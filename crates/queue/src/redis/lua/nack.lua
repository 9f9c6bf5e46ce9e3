-- Fails one delivery: a retry after the delay, or a dead letter on its last attempt.
-- ARGV: prefix, queue, entry id, token, error, delay (ms), max attempts.
-- Returns {0} lease lost, {1, retry time} or {2} dead-lettered.
local now = now_ms()
local q, id = ARGV[2], ARGV[3]
local name = live_lease(q, id, ARGV[4], now)
if not name then
  return {0}
end
local at = fail_attempt(q, id, name, ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]), now)
forget_lease_if_empty(q, name)
if at < 0 then
  return {2}
end
return {1, fmt(at)}
