-- Lists lapsed leases of one capability whose step is still dispatched; drops lease entries
-- of steps that are not (finished or cancelled meanwhile).
-- KEYS[1] the capability's lease set
-- ARGV[1] prefix   ARGV[2] most entries to return
-- Returns rows {'task_id', id, 'step', n, 'attempt', n, 'worker', id,
--   'dispatched_at_ms', ms, 'timeout_ms', ms}.
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', int(now), 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, m in ipairs(due) do
  local id, step = split_member(m)
  local k = step_fields(step)
  local v = redis.call('HMGET', task_key(ARGV[1], id), F.status, k.status, k.attempt,
    k.worker, k.dispatched_at, k.timeout_ms)
  if v[1] and not terminal(v[1]) and v[2] == 'dispatched' then
    out[#out + 1] = {'task_id', id, 'step', step, 'attempt', v[3] or '0', 'worker', v[4] or '',
      'dispatched_at_ms', v[5] or '0', 'timeout_ms', v[6] or '0'}
  else
    redis.call('ZREM', KEYS[1], m)
  end
end
return out
