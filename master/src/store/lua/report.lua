-- Records a step attempt's outcome if the attempt is current (fencing): queues the next
-- step, schedules a retry after a backoff, or finishes the task (dead-lettering a failure).
-- KEYS[1] task hash
-- ARGV[1] prefix   ARGV[2] task id   ARGV[3] step   ARGV[4] attempt
-- ARGV[5] 'succeeded' | 'failed'   ARGV[6] output JSON, or error JSON when failed
-- ARGV[7] '1' when the error is retryable   ARGV[8] retry base ms   ARGV[9] retry max ms
-- ARGV[10] jitter in [0, 1)   ARGV[11] retention ms
-- Returns {'discarded'} | {'next', cap, dispatched_ms, next_cap}
--       | {'retry', cap, dispatched_ms, delay_ms}
--       | {'done', cap, dispatched_ms, status, '1' when the task has a callback URL else '0'}
local now = now_ms()
local prefix, id, step = ARGV[1], ARGV[2], ARGV[3]
local v = redis.call('HMGET', KEYS[1], 'st', step .. ':s', step .. ':a', step .. ':c',
  step .. ':w', step .. ':d', step .. ':t', step .. ':m', 'n', 'pr', 'caps', 'cb')
if not v[1] or terminal(v[1]) or v[2] ~= 'dispatched' or v[3] ~= ARGV[4] then
  return {'discarded'}
end
local member = id .. ':' .. step
local cap = v[4]
local dispatched = v[6] or '0'
local callback = '0'
if v[12] then callback = '1' end
redis.call('ZREM', lease_key(prefix, cap), member)
release_load(prefix, v[5])
if ARGV[5] == 'succeeded' then
  local s = tonumber(step)
  if s + 1 < tonumber(v[9]) then
    local nxt = tostring(s + 1)
    local next_cap = split_commas(v[11])[s + 2]
    redis.call('HSET', KEYS[1], step .. ':s', 'succeeded', step .. ':o', ARGV[6],
      step .. ':f', int(now), nxt .. ':s', 'queued', nxt .. ':q', int(now))
    redis.call('ZADD', queue_key(prefix, next_cap), score(v[10], now), id .. ':' .. nxt)
    return {'next', cap, dispatched, next_cap}
  end
  redis.call('HSET', KEYS[1], step .. ':s', 'succeeded', step .. ':o', ARGV[6],
    step .. ':f', int(now), 'st', 'succeeded', 'fa', int(now))
  redis.call('PEXPIRE', KEYS[1], ARGV[11])
  redis.call('PUBLISH', events_channel(prefix), 'done:' .. id)
  return {'done', cap, dispatched, 'succeeded', callback}
end
local tries = tonumber(v[7] or '1')
local max = tonumber(v[8] or '1')
if ARGV[7] == '1' and tries < max then
  local full = tonumber(ARGV[8]) * (2 ^ (tries - 1))
  if full > tonumber(ARGV[9]) then full = tonumber(ARGV[9]) end
  local delay = math.floor(full / 2 + full / 2 * tonumber(ARGV[10]))
  redis.call('HSET', KEYS[1], step .. ':s', 'queued', step .. ':e', ARGV[6],
    step .. ':q', int(now + delay))
  redis.call('ZADD', delayed_key(prefix, cap), int(now + delay), member)
  return {'retry', cap, dispatched, int(delay)}
end
redis.call('HSET', KEYS[1], step .. ':s', 'failed', step .. ':e', ARGV[6], step .. ':f', int(now),
  'st', 'failed', 'er', ARGV[6], 'fa', int(now))
redis.call('ZADD', dead_key(prefix, cap), int(now), id)
redis.call('PEXPIRE', KEYS[1], ARGV[11])
redis.call('PUBLISH', events_channel(prefix), 'done:' .. id)
return {'done', cap, dispatched, 'failed', callback}
