-- Records how a claimed callback delivery attempt ended (see callback_claim.lua), if that
-- attempt is still the latest one claimed: a claim whose visibility ran out and was taken
-- over by another replica records nothing.
-- KEYS[1] task hash   KEYS[2] the outbox
-- ARGV[1] task id   ARGV[2] attempt   ARGV[3] 'delivered' | 'retry' | 'failed'
-- ARGV[4] the error (retry, failed)   ARGV[5] backoff ms (retry)
-- Returns {'outcome', 'recorded'}, or {'outcome', 'stale'} when the attempt is not the
-- latest (or the task is gone).
local v = redis.call('HMGET', KEYS[1], F.callback_status, F.callback_attempts)
if v[1] ~= 'pending' or v[2] ~= ARGV[2] then return {'outcome', 'stale'} end
if ARGV[3] == 'retry' then
  redis.call('HSET', KEYS[1], F.callback_error, ARGV[4])
  redis.call('ZADD', KEYS[2], int(now_ms() + tonumber(ARGV[5])), ARGV[1])
  return {'outcome', 'recorded'}
end
if ARGV[3] == 'delivered' then
  redis.call('HSET', KEYS[1], F.callback_status, 'delivered')
else
  redis.call('HSET', KEYS[1], F.callback_status, 'failed', F.callback_error, ARGV[4])
end
redis.call('ZREM', KEYS[2], ARGV[1])
return {'outcome', 'recorded'}
