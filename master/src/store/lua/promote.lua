-- Moves steps whose retry backoff is over from the delayed set into the ready queue.
-- KEYS[1] the capability's delayed set   KEYS[2] its queue
-- ARGV[1] prefix   ARGV[2] most steps to move
-- Returns how many moved.
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', int(now), 'LIMIT', 0, tonumber(ARGV[2]))
local moved = 0
for _, m in ipairs(due) do
  local id, step = split_member(m)
  local k = step_fields(step)
  local v = redis.call('HMGET', task_key(ARGV[1], id), F.status, k.status, F.priority,
    k.queued_at)
  redis.call('ZREM', KEYS[1], m)
  if v[1] and not terminal(v[1]) and v[2] == 'queued' then
    redis.call('ZADD', KEYS[2], score(v[3], v[4]), m)
    moved = moved + 1
  end
end
return moved
