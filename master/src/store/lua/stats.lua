-- Queue figures per capability; prunes dead letters older than the retention (their tasks
-- have expired).
-- ARGV[1] prefix   ARGV[2] retention ms   ARGV[3 ..] capabilities
-- Returns one row per capability: {queued, delayed, in_flight, dead, head_queued_ms or ''}.
local now = now_ms()
local out = {}
for i = 3, #ARGV do
  local cap = ARGV[i]
  local q = queue_key(ARGV[1], cap)
  redis.call('ZREMRANGEBYSCORE', dead_key(ARGV[1], cap), '-inf', int(now - tonumber(ARGV[2])))
  local head = redis.call('ZRANGE', q, 0, 0)
  local head_at = ''
  if #head > 0 then
    local id, step = split_member(head[1])
    head_at = redis.call('HGET', task_key(ARGV[1], id), step .. ':q') or ''
  end
  out[#out + 1] = {redis.call('ZCARD', q), redis.call('ZCARD', delayed_key(ARGV[1], cap)),
    redis.call('ZCARD', lease_key(ARGV[1], cap)), redis.call('ZCARD', dead_key(ARGV[1], cap)),
    head_at}
end
return out
