-- Cancels a task: takes its active step out of every queue and lease, marks it cancelled,
-- and puts its completion callback (if it has a callback URL) in the outbox.
-- KEYS[1] task hash
-- ARGV[1] prefix   ARGV[2] task id   ARGV[3] retention ms   ARGV[4] the step error JSON
-- Returns {'cancelled'} | {'finished', status} | {'missing'}
local v = redis.call('HMGET', KEYS[1], 'st', 'n', 'cb')
if not v[1] then return {'missing'} end
if terminal(v[1]) then return {'finished', v[1]} end
local now_num = now_ms()
local now = int(now_num)
for i = 0, tonumber(v[2]) - 1 do
  local s = redis.call('HMGET', KEYS[1], i .. ':s', i .. ':c', i .. ':w')
  if s[1] == 'queued' or s[1] == 'dispatched' then
    local member = ARGV[2] .. ':' .. i
    redis.call('ZREM', queue_key(ARGV[1], s[2]), member)
    redis.call('ZREM', delayed_key(ARGV[1], s[2]), member)
    if redis.call('ZREM', lease_key(ARGV[1], s[2]), member) == 1 then
      release_load(ARGV[1], s[3])
    end
    redis.call('HSET', KEYS[1], i .. ':s', 'failed', i .. ':e', ARGV[4], i .. ':f', now)
  end
end
redis.call('HSET', KEYS[1], 'st', 'cancelled', 'fa', now)
if v[3] then queue_callback(ARGV[1], KEYS[1], ARGV[2], now_num) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PUBLISH', events_channel(ARGV[1]), 'done:' .. ARGV[2])
return {'cancelled'}
