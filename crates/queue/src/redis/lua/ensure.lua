-- Creates a queue's stream and consumer group if missing, before a batch of plain XADDs.
-- The group is checked on its own: appends that ran while this library was missing may have
-- created the stream without it.
-- ARGV: prefix, queue.
local q = ARGV[2]
local s = qkey('q', q)
if redis.call('EXISTS', s) == 0 then
  ensure_queue(q)
elseif redis.call('SISMEMBER', P .. ':queues', q) == 0 then
  redis.pcall('XGROUP', 'CREATE', s, GROUP, '0')
  redis.call('SADD', P .. ':queues', q)
end
return 1
