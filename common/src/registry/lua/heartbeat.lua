-- Writes a worker's record with a TTL and moves its expiry forward in the live set.
-- Announces a worker that was not registered on the events channel, so dispatchers wake.
-- KEYS[1]  the worker's record key
-- KEYS[2]  the live-workers sorted set (member: worker id, score: expiry in ms)
-- ARGV[1]  the record (JSON)
-- ARGV[2]  TTL in milliseconds
-- ARGV[3]  the worker id
-- ARGV[4]  the events channel
-- Returns 1 when the worker was new (or had expired), 0 otherwise.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local existed = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[3])
if existed == 0 then
  redis.call('PUBLISH', ARGV[4], 'worker:' .. ARGV[3])
  return 1
end
return 0
