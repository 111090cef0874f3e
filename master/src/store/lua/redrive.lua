-- Re-runs a failed task from its failed and stopped steps (docs/workflows.md, rule 10):
-- attempts reset, steps that succeeded keep their outputs; out of the dead-letter set (and
-- its callback out of the outbox: the next finish queues a fresh one).
-- KEYS[1] task hash   KEYS[2] the operators' event stream, while it records
-- ARGV[1] prefix   ARGV[2] task id   ARGV[3] retention ms (if a step it re-runs finishes the
-- task at once)
-- A task dead-lettered under a capability (F.dead_capability) that is no longer in that
-- set was purged by an operator: it is not redriven.
-- Returns {'outcome', 'redriven'[, 'queued', caps]}
--       | {'outcome', 'not_failed', 'status', status} | {'outcome', 'purged'}
--       | {'outcome', 'missing'}
local now = now_ms()
g_begin(ARGV[1], ARGV[2], KEYS[1], now, KEYS[2])
g_legacy()
local v = g_read({F.status, F.step_count, F.started_at, F.budget_tokens, F.budget_cost_nanos,
  F.event_count, F.watched_until, F.dead_capability, F.created_at})
if not v[1] then return {'outcome', 'missing'} end
if v[1] ~= 'failed' then return {'outcome', 'not_failed', 'status', v[1]} end
if v[8] and not redis.call('ZSCORE', dead_key(ARGV[1], v[8]), ARGV[2]) then
  return {'outcome', 'purged'}
end
local n = tonumber(v[2] or '0')
local fields = {}
for i = 0, n - 1 do
  for _, name in ipairs({'status', 'capability', 'allow_failure', 'parent', 'kind',
      'map_from', 'map_base', 'wait_ms'}) do
    fields[#fields + 1] = at(i, name)
  end
end
local s = g_read(fields)
local again = {}
for i = 0, n - 1 do
  local b = i * 8
  local status, cap, allow, parent = s[b + 1], s[b + 2], s[b + 3], s[b + 4]
  local allowed = allow == '1'
  if parent then allowed = s[tonumber(parent) * 8 + 3] == '1' end
  if status == 'cancelled' or (status == 'failed' and not allowed) then
    again[#again + 1] = i
    if cap then redis.call('ZREM', dead_key(ARGV[1], cap), ARGV[2]) end
  end
end
if #again == 0 then return {'outcome', 'not_failed', 'status', v[1]} end
local status = 'queued'
if v[3] then status = 'running' end
g_set(F.status, status)
g_del(F.finished_at)
g_del(F.error)
g_del(F.failed_step)
g_del(F.dead_capability)
redis.call('ZREM', index_key(ARGV[1]), ix_status('failed', pad_ms(v[9]), ARGV[2]))
-- The failure's callback, delivered or not, is superseded by the next finish's.
g_del(F.callback_status)
g_del(F.callback_attempts)
g_del(F.callback_error)
redis.call('ZREM', callbacks_key(ARGV[1]), ARGV[2])
redis.call('PERSIST', KEYS[1])
if v[4] or v[5] then redis.call('PERSIST', usage_key(ARGV[1], ARGV[2])) end
G.redriven = true
for _, i in ipairs(again) do
  local b = i * 8
  g_del(at(i, 'finished_at'))
  g_del(at(i, 'error'))
  g_set(at(i, 'tries'), '0')
  g_set(at(i, 'free_failures'), '0')
  if s[b + 6] and s[b + 7] then
    -- A map step that had expanded: its instances run again by this same rule.
    g_set(at(i, 'status'), 'running')
  elseif s[b + 5] or s[b + 6] then
    ready(i)
  else
    g_queue(i)
  end
end
local reply = {'outcome', 'redriven'}
for _, x in ipairs(g_end(nil, ARGV[3])) do reply[#reply + 1] = x end
return reply
