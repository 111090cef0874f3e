-- Delivers a signal to the task's wait step that listens for it (docs/workflows.md,
-- rule 12): a waiting step succeeds with the payload and the task goes on; a step not
-- reached yet gets the payload when it is.
-- KEYS[1] task hash   KEYS[2] the operators' event stream, while it records
-- ARGV[1] prefix   ARGV[2] task id   ARGV[3] signal name   ARGV[4] payload JSON
-- ARGV[5] retention ms
-- Returns {'outcome', 'delivered'[, 'queued', caps][, 'status', s, 'callback', c, ...]}
--       | {'outcome', 'buffered'} | {'outcome', 'unknown'} | {'outcome', 'already'}
--       | {'outcome', 'finished', 'status', s} | {'outcome', 'missing'}
local now = now_ms()
g_begin(ARGV[1], ARGV[2], KEYS[1], now, KEYS[2])
g_legacy()
local name = ARGV[3]
local v = g_read({F.status, signal_field(name), buffered_field(name), F.budget_tokens,
  F.budget_cost_nanos, F.event_count, F.watched_until, F.created_at})
if not v[1] then return {'outcome', 'missing'} end
if terminal(v[1]) then return {'outcome', 'finished', 'status', v[1]} end
if not v[2] then return {'outcome', 'unknown'} end
local slot = tonumber(v[2])
local status = g_read({at(slot, 'status')})[1]
if status == 'pending' then
  if v[3] then return {'outcome', 'already'} end
  g_set(buffered_field(name), ARGV[4])
  G.signal = {name = name, slot = slot, buffered = true}
  g_flush()
  return {'outcome', 'buffered'}
end
if status ~= 'waiting' then return {'outcome', 'already'} end
G.signal = {name = name, slot = slot, buffered = false}
redis.call('ZREM', timers_key(ARGV[1]), member(ARGV[2], slot))
g_del(at(slot, 'wakes_at'))
g_set(at(slot, 'status'), 'succeeded')
g_set(at(slot, 'output'), ARGV[4])
g_set(at(slot, 'finished_at'), int(now))
finish(slot, 'succeeded')
local reply = {'outcome', 'delivered'}
for _, x in ipairs(g_end(nil, ARGV[5])) do reply[#reply + 1] = x end
return reply
