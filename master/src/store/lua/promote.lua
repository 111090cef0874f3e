-- Moves steps whose retry backoff is over from the delayed set into the ready queue.
-- KEYS[1] the capability's delayed set   KEYS[2] its queue
-- ARGV[1] prefix   ARGV[2] most steps to move
-- Returns how many moved.
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', int(now), 'LIMIT', 0, tonumber(ARGV[2]))
local moved = 0
for _, member in ipairs(due) do
  local id, step = split_member(member)
  local v = redis.call('HMGET', task_key(ARGV[1], id), 'st', step .. ':s', 'pr', step .. ':q')
  redis.call('ZREM', KEYS[1], member)
  if v[1] and not terminal(v[1]) and v[2] == 'queued' then
    redis.call('ZADD', KEYS[2], score(v[3], v[4]), member)
    moved = moved + 1
  end
end
return moved
