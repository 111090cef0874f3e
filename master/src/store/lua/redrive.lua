-- Re-runs a failed task from its failed step: attempts reset, out of the dead-letter set
-- (and its callback out of the outbox: the next finish queues a fresh one).
-- KEYS[1] task hash
-- ARGV[1] prefix   ARGV[2] task id
-- Returns {'outcome', 'redriven', 'capability', cap} | {'outcome', 'not_failed', 'status', status}
--       | {'outcome', 'missing'}
local v = redis.call('HMGET', KEYS[1], F.status, F.step_count, F.priority, F.started_at)
if not v[1] then return {'outcome', 'missing'} end
if v[1] ~= 'failed' then return {'outcome', 'not_failed', 'status', v[1]} end
local now = now_ms()
for i = 0, tonumber(v[2]) - 1 do
  local k = step_fields(i)
  local s = redis.call('HMGET', KEYS[1], k.status, k.capability)
  if s[1] == 'failed' then
    local status = 'queued'
    if v[4] then status = 'running' end
    redis.call('HSET', KEYS[1], k.status, 'queued', k.tries, '0', k.queued_at, int(now),
      F.status, status)
    -- The failure's callback, delivered or not, is superseded by the next finish's.
    redis.call('HDEL', KEYS[1], F.finished_at, F.error, k.finished_at, F.callback_status,
      F.callback_attempts, F.callback_error)
    redis.call('ZREM', callbacks_key(ARGV[1]), ARGV[2])
    redis.call('PERSIST', KEYS[1])
    redis.call('ZREM', dead_key(ARGV[1], s[2]), ARGV[2])
    redis.call('ZADD', queue_key(ARGV[1], s[2]), score(v[3], now), member(ARGV[2], i))
    return {'outcome', 'redriven', 'capability', s[2]}
  end
end
return {'outcome', 'not_failed', 'status', v[1]}
