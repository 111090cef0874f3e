-- Records a step attempt's outcome if the attempt is current and the reporting worker holds
-- its lease (fencing): finishes the step and sets going what it made ready (graph.lua),
-- schedules a retry after a backoff, or fails the step for good (failing the task and
-- dead-lettering it unless the failure is allowed). A finished task with a callback URL
-- enters the callback outbox in the same step, so the callback is not lost if this replica
-- dies next. The reply is remembered with the step, so a repeat of the report that was
-- recorded (its first reply was lost) gets the same reply again, marked `replayed`, instead
-- of `discarded` (S.report_key who reported what, S.report_reply the reply).
-- KEYS[1] task hash   KEYS[2] the operators' event stream, while it records
-- ARGV[1] prefix   ARGV[2] task id   ARGV[3] step   ARGV[4] attempt
-- ARGV[5] 'succeeded' | 'failed'   ARGV[6] output JSON, or error JSON when failed
-- ARGV[7] '1' when the error is retryable   ARGV[8] retry base ms   ARGV[9] retry max ms
-- ARGV[10] jitter in [0, 1)   ARGV[11] retention ms   ARGV[12] the reporting worker
-- ARGV[13] '1' when the next attempt should go to another worker if one is free (the
--          attempt was lost on this one: lease lapsed, dispatch refused)
-- Returns {'outcome', 'discarded'}
--       | {'outcome', 'next', 'capability', cap, 'dispatched_at_ms', ms, 'queued', caps}
--       | {'outcome', 'retry', 'capability', cap, 'dispatched_at_ms', ms, 'delay_ms', ms}
--       | {'outcome', 'done', 'capability', cap, 'dispatched_at_ms', ms, 'status', status,
--          'callback', '1' when the task has a callback URL else '0'[, 'result', json]
--          [, 'error', json]}
-- and a replay is the recorded reply with 'replayed', '1' added ('result' and 'error' are
-- not remembered: a replay's caller reads the task when it needs them).
local now = now_ms()
local prefix, id, step = ARGV[1], ARGV[2], ARGV[3]
local slot = tonumber(step)
g_begin(prefix, id, KEYS[1], now, KEYS[2])
local v = g_read({F.status, at(slot, 'status'), at(slot, 'attempt'), at(slot, 'capability'),
  at(slot, 'worker'), at(slot, 'dispatched_at'), at(slot, 'tries'), at(slot, 'max_attempts'),
  F.open, F.priority, F.callback_url, at(slot, 'report_key'), at(slot, 'report_reply'),
  at(slot, 'dependants'), at(slot, 'parent'), at(slot, 'router'), F.sinks, F.declared,
  F.step_count, F.budget_tokens, F.budget_cost_nanos, at(slot, 'id'), F.event_count,
  F.watched_until, F.created_at})
if not v[1] then return {'outcome', 'discarded'} end
-- Who reported what: a repeat of exactly this report is a replay. The master's own
-- reports for a lost attempt (ARGV[13]) are not remembered, so the worker's late report of
-- that attempt is discarded, not taken for a replay.
local record_key = ARGV[4] .. '|' .. ARGV[12] .. '|' .. ARGV[5]
if terminal(v[1]) or v[2] ~= 'dispatched' or v[3] ~= ARGV[4] or v[5] ~= ARGV[12] then
  if v[12] == record_key and v[13] then
    local out = {'replayed', '1'}
    for part in string.gmatch(v[13], '[^|]+') do out[#out + 1] = part end
    return out
  end
  return {'outcome', 'discarded'}
end
g_legacy()
local m = member(id, step)
local cap = v[4]
local dispatched = v[6] or '0'
redis.call('ZREM', lease_key(prefix, cap), m)
release_load(prefix, v[5])
-- Remembers this reply with the step (in the transition's one HSET).
local function remember(reply)
  if ARGV[13] == '1' then return end
  g_set(at(slot, 'report_key'), record_key)
  g_set(at(slot, 'report_reply'), table.concat(reply, '|'))
end
local head = {'capability', cap, 'dispatched_at_ms', dispatched}
-- The reply for a transition that finished the step (the task went on, or finished).
local function settle()
  local reply = {'outcome', 'next'}
  for _, x in ipairs(head) do reply[#reply + 1] = x end
  local rest = g_end(slot, ARGV[11], function(rest)
    if G.done then reply[2] = 'done' end
    local short = {}
    for _, x in ipairs(reply) do short[#short + 1] = x end
    for i = 1, #rest, 2 do
      if rest[i] ~= 'result' and rest[i] ~= 'error' then
        short[#short + 1] = rest[i]
        short[#short + 1] = rest[i + 1]
      end
    end
    remember(short)
  end)
  for _, x in ipairs(rest) do reply[#reply + 1] = x end
  return reply
end
if ARGV[5] == 'succeeded' then
  g_set(at(slot, 'status'), 'succeeded')
  g_set(at(slot, 'output'), ARGV[6])
  g_set(at(slot, 'finished_at'), int(now))
  if v[16] ~= '1' or route(slot, ARGV[6]) then finish(slot, 'succeeded') end
  return settle()
end
local tries = tonumber(v[7] or '1')
local max = tonumber(v[8] or '1')
if ARGV[7] == '1' and tries < max then
  local full = tonumber(ARGV[8]) * (2 ^ (tries - 1))
  if full > tonumber(ARGV[9]) then full = tonumber(ARGV[9]) end
  local delay = math.floor(full / 2 + full / 2 * tonumber(ARGV[10]))
  local reply = {'outcome', 'retry', 'capability', cap, 'dispatched_at_ms', dispatched,
    'delay_ms', int(delay)}
  g_set(at(slot, 'status'), 'queued')
  g_set(at(slot, 'error'), ARGV[6])
  g_set(at(slot, 'queued_at'), int(now + delay))
  if ARGV[13] == '1' then g_set(at(slot, 'avoid_worker'), ARGV[12]) end
  remember(reply)
  g_flush()
  redis.call('ZADD', delayed_key(prefix, cap), int(now + delay), m)
  return reply
end
fail_for_good(slot, ARGV[6])
return settle()
