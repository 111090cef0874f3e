-- Lists lapsed leases of one capability whose step is still dispatched; drops lease entries
-- of steps that are not (finished or cancelled meanwhile).
-- KEYS[1] the capability's lease set
-- ARGV[1] prefix   ARGV[2] most entries to return
-- Returns rows {task_id, step, attempt, worker, dispatched_ms, timeout_ms}.
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', int(now), 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, member in ipairs(due) do
  local id, step = split_member(member)
  local v = redis.call('HMGET', task_key(ARGV[1], id), 'st', step .. ':s', step .. ':a',
    step .. ':w', step .. ':d', step .. ':to')
  if v[1] and not terminal(v[1]) and v[2] == 'dispatched' then
    out[#out + 1] = {id, step, v[3] or '0', v[4] or '', v[5] or '0', v[6] or '0'}
  else
    redis.call('ZREM', KEYS[1], member)
  end
end
return out
