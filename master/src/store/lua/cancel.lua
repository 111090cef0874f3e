-- Cancels a task: takes its active step out of every queue and lease, marks it cancelled,
-- and puts its completion callback (if it has a callback URL) in the outbox.
-- KEYS[1] task hash
-- ARGV[1] prefix   ARGV[2] task id   ARGV[3] retention ms   ARGV[4] the step error JSON
-- Returns {'outcome', 'cancelled'} | {'outcome', 'finished', 'status', status}
--       | {'outcome', 'missing'}
local v = redis.call('HMGET', KEYS[1], F.status, F.step_count, F.callback_url)
if not v[1] then return {'outcome', 'missing'} end
if terminal(v[1]) then return {'outcome', 'finished', 'status', v[1]} end
local now_num = now_ms()
local now = int(now_num)
for i = 0, tonumber(v[2]) - 1 do
  local k = step_fields(i)
  local s = redis.call('HMGET', KEYS[1], k.status, k.capability, k.worker)
  if s[1] == 'queued' or s[1] == 'dispatched' then
    local m = member(ARGV[2], i)
    redis.call('ZREM', queue_key(ARGV[1], s[2]), m)
    redis.call('ZREM', delayed_key(ARGV[1], s[2]), m)
    if redis.call('ZREM', lease_key(ARGV[1], s[2]), m) == 1 then
      release_load(ARGV[1], s[3])
    end
    redis.call('HSET', KEYS[1], k.status, 'failed', k.error, ARGV[4], k.finished_at, now)
  end
end
redis.call('HSET', KEYS[1], F.status, 'cancelled', F.finished_at, now)
if v[3] then queue_callback(ARGV[1], KEYS[1], ARGV[2], now_num) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PUBLISH', events_channel(ARGV[1]), 'done:' .. ARGV[2])
return {'outcome', 'cancelled'}
