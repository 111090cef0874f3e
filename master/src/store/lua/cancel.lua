-- Cancels a task: every queued, running or waiting step (all branches) is taken out of its
-- queue, lease and timer and marked cancelled, and the task's completion callback (if it
-- has a callback URL) goes in the outbox.
-- KEYS[1] task hash   KEYS[2] the operators' event stream, while it records
-- ARGV[1] prefix   ARGV[2] task id   ARGV[3] retention ms   ARGV[4] the step error JSON
-- Returns {'outcome', 'cancelled'} | {'outcome', 'finished', 'status', status}
--       | {'outcome', 'missing'}
local now = now_ms()
g_begin(ARGV[1], ARGV[2], KEYS[1], now, KEYS[2])
g_legacy()
local v = g_read({F.status, F.step_count, F.callback_url, F.budget_tokens, F.budget_cost_nanos,
  F.event_count, F.watched_until, F.created_at})
if not v[1] then return {'outcome', 'missing'} end
if terminal(v[1]) then return {'outcome', 'finished', 'status', v[1]} end
stop_all(-1, ARGV[4])
g_set(F.status, 'cancelled')
g_set(F.finished_at, int(now))
g_flush()
if v[3] then queue_callback(ARGV[1], KEYS[1], ARGV[2], now) end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if v[4] or v[5] then redis.call('PEXPIRE', usage_key(ARGV[1], ARGV[2]), ARGV[3]) end
redis.call('ZADD', index_key(ARGV[1]), 0, ix_status('cancelled', pad_ms(v[8]), ARGV[2]))
redis.call('PUBLISH', events_channel(ARGV[1]), 'done:' .. ARGV[2])
return {'outcome', 'cancelled'}
