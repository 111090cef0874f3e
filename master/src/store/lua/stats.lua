-- Queue figures per capability; prunes dead letters older than the retention (their tasks
-- have expired).
-- ARGV[1] prefix   ARGV[2] retention ms   ARGV[3 ..] capabilities
-- Returns one row per capability, in order: {'queued', n, 'delayed', n, 'in_flight', n,
--   'dead_lettered', n, ['head_queued_at_ms', ms when the queue is not empty]}.
local now = now_ms()
local out = {}
for i = 3, #ARGV do
  local cap = ARGV[i]
  local q = queue_key(ARGV[1], cap)
  redis.call('ZREMRANGEBYSCORE', dead_key(ARGV[1], cap), '-inf', int(now - tonumber(ARGV[2])))
  local row = {'queued', redis.call('ZCARD', q),
    'delayed', redis.call('ZCARD', delayed_key(ARGV[1], cap)),
    'in_flight', redis.call('ZCARD', lease_key(ARGV[1], cap)),
    'dead_lettered', redis.call('ZCARD', dead_key(ARGV[1], cap))}
  local head = redis.call('ZRANGE', q, 0, 0)
  if #head > 0 then
    local id, step = split_member(head[1])
    local at = redis.call('HGET', task_key(ARGV[1], id), at_step(step, S.queued_at))
    if at then
      row[#row + 1] = 'head_queued_at_ms'
      row[#row + 1] = at
    end
  end
  out[#out + 1] = row
end
return out
