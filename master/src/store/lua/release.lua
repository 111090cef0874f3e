-- Puts a claimed step back at its place in the queue without spending an attempt: the
-- worker never took it (429, connection refused). A no-op unless the attempt is current.
-- KEYS[1] task hash
-- ARGV[1] prefix   ARGV[2] task id   ARGV[3] step   ARGV[4] attempt
-- Returns 1 when released, 0 otherwise.
local step = ARGV[3]
local v = redis.call('HMGET', KEYS[1], 'st', step .. ':s', step .. ':a', step .. ':c',
  step .. ':w', step .. ':t', 'pr', step .. ':q')
if not v[1] or terminal(v[1]) or v[2] ~= 'dispatched' or v[3] ~= ARGV[4] then
  return 0
end
local member = ARGV[2] .. ':' .. step
redis.call('ZREM', lease_key(ARGV[1], v[4]), member)
release_load(ARGV[1], v[5])
local tries = tonumber(v[6] or '1') - 1
if tries < 0 then tries = 0 end
redis.call('HSET', KEYS[1], step .. ':s', 'queued', step .. ':t', tostring(tries))
redis.call('ZADD', queue_key(ARGV[1], v[4]), score(v[7], v[8]), member)
return 1
