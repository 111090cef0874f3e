-- Re-runs a failed task from its failed step: attempts reset, out of the dead-letter set
-- (and its callback out of the outbox: the next finish queues a fresh one).
-- KEYS[1] task hash
-- ARGV[1] prefix   ARGV[2] task id
-- Returns {'redriven', cap} | {'not_failed', status} | {'missing'}
local v = redis.call('HMGET', KEYS[1], 'st', 'n', 'pr', 'sa')
if not v[1] then return {'missing'} end
if v[1] ~= 'failed' then return {'not_failed', v[1]} end
local now = now_ms()
for i = 0, tonumber(v[2]) - 1 do
  local s = redis.call('HMGET', KEYS[1], i .. ':s', i .. ':c')
  if s[1] == 'failed' then
    local status = 'queued'
    if v[4] then status = 'running' end
    redis.call('HSET', KEYS[1], i .. ':s', 'queued', i .. ':t', '0', i .. ':q', int(now),
      'st', status)
    -- The failure's callback, delivered or not, is superseded by the next finish's.
    redis.call('HDEL', KEYS[1], 'fa', 'er', i .. ':f', 'cbs', 'cbn', 'cbe')
    redis.call('ZREM', callbacks_key(ARGV[1]), ARGV[2])
    redis.call('PERSIST', KEYS[1])
    redis.call('ZREM', dead_key(ARGV[1], s[2]), ARGV[2])
    redis.call('ZADD', queue_key(ARGV[1], s[2]), score(v[3], now), ARGV[2] .. ':' .. i)
    return {'redriven', s[2]}
  end
end
return {'not_failed', v[1]}
