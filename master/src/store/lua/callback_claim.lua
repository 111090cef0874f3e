-- Claims completion callbacks that are due from the outbox (a sorted set of task ids by due
-- time, filled by report.lua and cancel.lua through lib.lua's queue_callback). Each claim
-- starts a delivery attempt: `cbn` (attempts claimed) goes up by one and is the fencing
-- token of callback_finish.lua, and the entry's due time moves out by the visibility
-- timeout, so when the claiming replica dies another one claims it then.
-- Task hash fields: `cb` URL, `cbs` pending|delivered|failed, `cbn` attempts, `cbe` last error.
-- KEYS[1] the outbox
-- ARGV[1] prefix   ARGV[2] most entries to claim   ARGV[3] visibility ms
-- ARGV[4] max attempts   ARGV[5] last error for a callback whose attempts were all
--         claimed and never finished
-- Returns rows {task_id, attempt, field, value, field, value, ...}: the task hash after the
-- claim. Entries whose task expired, runs again (redriven), or has no pending callback are
-- dropped.
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', int(now), 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(due) do
  local key = task_key(ARGV[1], id)
  local v = redis.call('HMGET', key, 'st', 'cb', 'cbs', 'cbn')
  local claimed = tonumber(v[4] or '0')
  if not v[1] or not terminal(v[1]) or not v[2] or v[3] ~= 'pending' then
    redis.call('ZREM', KEYS[1], id)
  elseif claimed >= tonumber(ARGV[4]) then
    redis.call('HSET', key, 'cbs', 'failed', 'cbe', ARGV[5])
    redis.call('ZREM', KEYS[1], id)
  else
    local attempt = int(claimed + 1)
    redis.call('HSET', key, 'cbn', attempt)
    redis.call('ZADD', KEYS[1], int(now + tonumber(ARGV[3])), id)
    local row = {id, attempt}
    for _, x in ipairs(redis.call('HGETALL', key)) do row[#row + 1] = x end
    out[#out + 1] = row
  end
end
return out
