-- Submits a task: idempotency, per-client rate limit (GCRA), the task hash, step 0 queued.
-- KEYS[1] task hash              KEYS[2] idempotency key (used when ARGV[6] == '1')
-- KEYS[3] rate-limit key         KEYS[4] queue of step 0's capability
-- KEYS[5] set of capabilities seen in inline steps
-- ARGV[1] prefix   ARGV[2] task id   ARGV[3] rate per second (0 = no limit)   ARGV[4] burst
-- ARGV[5] retention ms   ARGV[6] '1' with an idempotency key   ARGV[7] priority
-- ARGV[8] k = capabilities to remember; ARGV[9 .. 8+k] those; ARGV[9+k ..] field/value
-- pairs of the task hash.
-- Returns {'outcome', 'created'} | {'outcome', 'exists', 'task_id', id}
--       | {'outcome', 'limited', 'retry_after_ms', ms}
local now = now_ms()
if ARGV[6] == '1' then
  local existing = redis.call('GET', KEYS[2])
  if existing and redis.call('EXISTS', task_key(ARGV[1], existing)) == 1 then
    return {'outcome', 'exists', 'task_id', existing}
  end
end
local rate = tonumber(ARGV[3])
if rate > 0 then
  local interval = 1000 / rate
  local tolerance = interval * tonumber(ARGV[4])
  local tat = tonumber(redis.call('GET', KEYS[3]) or '0')
  if tat < now then tat = now end
  local new_tat = tat + interval
  if new_tat - now > tolerance then
    return {'outcome', 'limited', 'retry_after_ms', int(math.ceil(new_tat - now - tolerance))}
  end
  redis.call('SET', KEYS[3], string.format('%.3f', new_tat), 'PX', int(math.ceil(new_tat - now) + 1000))
end
if ARGV[6] == '1' then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[5])
end
local k = tonumber(ARGV[8])
if k > 0 then
  local caps = {}
  for i = 1, k do caps[i] = ARGV[8 + i] end
  redis.call('SADD', KEYS[5], unpack(caps))
end
local first = step_fields(0)
local fields = {F.status, 'queued', F.created_at, int(now), first.status, 'queued',
  first.queued_at, int(now)}
for i = 9 + k, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[4], score(ARGV[7], now), member(ARGV[2], 0))
return {'outcome', 'created'}
