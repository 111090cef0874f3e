-- Claims completion callbacks that are due from the outbox (a sorted set of task ids by due
-- time, filled by report.lua and cancel.lua through lib.lua's queue_callback). Each claim
-- starts a delivery attempt: F.callback_attempts goes up by one and is the fencing token
-- of callback_finish.lua, and the entry's due time moves out by the visibility timeout, so
-- when the claiming replica dies another one claims it then.
-- KEYS[1] the outbox
-- ARGV[1] prefix   ARGV[2] most entries to claim   ARGV[3] visibility ms
-- ARGV[4] max attempts   ARGV[5] last error for a callback whose attempts were all
--         claimed and never finished
-- Returns one row per claim: {'task_id', id, 'attempt', n, 'task', <the task hash after the
-- claim, as HGETALL gives it>}. Entries whose task expired, runs again (redriven), or has
-- no pending callback are dropped.
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', int(now), 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(due) do
  local key = task_key(ARGV[1], id)
  local v = redis.call('HMGET', key, F.status, F.callback_url, F.callback_status,
    F.callback_attempts)
  local claimed = tonumber(v[4] or '0')
  if not v[1] or not terminal(v[1]) or not v[2] or v[3] ~= 'pending' then
    redis.call('ZREM', KEYS[1], id)
  elseif claimed >= tonumber(ARGV[4]) then
    redis.call('HSET', key, F.callback_status, 'failed', F.callback_error, ARGV[5])
    redis.call('ZREM', KEYS[1], id)
  else
    local attempt = int(claimed + 1)
    redis.call('HSET', key, F.callback_attempts, attempt)
    redis.call('ZADD', KEYS[1], int(now + tonumber(ARGV[3])), id)
    out[#out + 1] = {'task_id', id, 'attempt', attempt, 'task', redis.call('HGETALL', key)}
  end
end
return out
