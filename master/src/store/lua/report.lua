-- Records a step attempt's outcome if the attempt is current and the reporting worker holds
-- its lease (fencing): queues the next step, schedules a retry after a backoff, or finishes
-- the task (dead-lettering a failure; a task with a callback URL enters the callback
-- outbox in the same step, so the callback is not lost if this replica dies next). The
-- reply is remembered with the step, so a repeat of the report that was recorded (its
-- first reply was lost) gets the same reply again, marked `replayed`, instead of
-- `discarded` (S.report_key who reported what, S.report_reply the reply).
-- KEYS[1] task hash
-- ARGV[1] prefix   ARGV[2] task id   ARGV[3] step   ARGV[4] attempt
-- ARGV[5] 'succeeded' | 'failed'   ARGV[6] output JSON, or error JSON when failed
-- ARGV[7] '1' when the error is retryable   ARGV[8] retry base ms   ARGV[9] retry max ms
-- ARGV[10] jitter in [0, 1)   ARGV[11] retention ms   ARGV[12] the reporting worker
-- ARGV[13] '1' when the next attempt should go to another worker if one is free (the
--          attempt was lost on this one: lease lapsed, dispatch refused)
-- Returns {'outcome', 'discarded'}
--       | {'outcome', 'next', 'capability', cap, 'dispatched_at_ms', ms,
--          'next_capability', cap}
--       | {'outcome', 'retry', 'capability', cap, 'dispatched_at_ms', ms, 'delay_ms', ms}
--       | {'outcome', 'done', 'capability', cap, 'dispatched_at_ms', ms, 'status', status,
--          'callback', '1' when the task has a callback URL else '0'}
-- and a replay is the recorded reply with 'replayed', '1' added.
local now = now_ms()
local prefix, id, step = ARGV[1], ARGV[2], ARGV[3]
local k = step_fields(step)
local v = redis.call('HMGET', KEYS[1], F.status, k.status, k.attempt, k.capability,
  k.worker, k.dispatched_at, k.tries, k.max_attempts, F.step_count, F.priority,
  F.capabilities, F.callback_url, k.report_key, k.report_reply)
if not v[1] then return {'outcome', 'discarded'} end
-- Who reported what: a repeat of exactly this report is a replay. The master's own
-- reports for a lost attempt (ARGV[13]) are not remembered, so the worker's late report of
-- that attempt is discarded, not taken for a replay.
local record_key = ARGV[4] .. '|' .. ARGV[12] .. '|' .. ARGV[5]
if terminal(v[1]) or v[2] ~= 'dispatched' or v[3] ~= ARGV[4] or v[5] ~= ARGV[12] then
  if v[13] == record_key and v[14] then
    local out = {'replayed', '1'}
    for part in string.gmatch(v[14], '[^|]+') do out[#out + 1] = part end
    return out
  end
  return {'outcome', 'discarded'}
end
local m = member(id, step)
local cap = v[4]
local dispatched = v[6] or '0'
local callback = '0'
if v[12] then callback = '1' end
redis.call('ZREM', lease_key(prefix, cap), m)
release_load(prefix, v[5])
-- The fields that remember this reply, appended to the branch's one HSET.
local function remember(fields, reply)
  if ARGV[13] == '1' then return fields end
  fields[#fields + 1] = k.report_key
  fields[#fields + 1] = record_key
  fields[#fields + 1] = k.report_reply
  fields[#fields + 1] = table.concat(reply, '|')
  return fields
end
if ARGV[5] == 'succeeded' then
  local s = tonumber(step)
  if s + 1 < tonumber(v[9]) then
    local nxt = step_fields(s + 1)
    local next_cap = split_commas(v[11])[s + 2]
    local reply = {'outcome', 'next', 'capability', cap, 'dispatched_at_ms', dispatched,
      'next_capability', next_cap}
    redis.call('HSET', KEYS[1], unpack(remember({k.status, 'succeeded', k.output, ARGV[6],
      k.finished_at, int(now), nxt.status, 'queued', nxt.queued_at, int(now)}, reply)))
    redis.call('ZADD', queue_key(prefix, next_cap), score(v[10], now), member(id, s + 1))
    return reply
  end
  local reply = {'outcome', 'done', 'capability', cap, 'dispatched_at_ms', dispatched,
    'status', 'succeeded', 'callback', callback}
  redis.call('HSET', KEYS[1], unpack(remember({k.status, 'succeeded', k.output, ARGV[6],
    k.finished_at, int(now), F.status, 'succeeded', F.finished_at, int(now)}, reply)))
  if v[12] then queue_callback(prefix, KEYS[1], id, now) end
  redis.call('PEXPIRE', KEYS[1], ARGV[11])
  redis.call('PUBLISH', events_channel(prefix), 'done:' .. id)
  return reply
end
local tries = tonumber(v[7] or '1')
local max = tonumber(v[8] or '1')
if ARGV[7] == '1' and tries < max then
  local full = tonumber(ARGV[8]) * (2 ^ (tries - 1))
  if full > tonumber(ARGV[9]) then full = tonumber(ARGV[9]) end
  local delay = math.floor(full / 2 + full / 2 * tonumber(ARGV[10]))
  local reply = {'outcome', 'retry', 'capability', cap, 'dispatched_at_ms', dispatched,
    'delay_ms', int(delay)}
  local fields = {k.status, 'queued', k.error, ARGV[6], k.queued_at, int(now + delay)}
  if ARGV[13] == '1' then
    fields[#fields + 1] = k.avoid_worker
    fields[#fields + 1] = ARGV[12]
  end
  redis.call('HSET', KEYS[1], unpack(remember(fields, reply)))
  redis.call('ZADD', delayed_key(prefix, cap), int(now + delay), m)
  return reply
end
local reply = {'outcome', 'done', 'capability', cap, 'dispatched_at_ms', dispatched,
  'status', 'failed', 'callback', callback}
redis.call('HSET', KEYS[1], unpack(remember({k.status, 'failed', k.error, ARGV[6],
  k.finished_at, int(now), F.status, 'failed', F.error, ARGV[6], F.finished_at, int(now)},
  reply)))
redis.call('ZADD', dead_key(prefix, cap), int(now), id)
if v[12] then queue_callback(prefix, KEYS[1], id, now) end
redis.call('PEXPIRE', KEYS[1], ARGV[11])
redis.call('PUBLISH', events_channel(prefix), 'done:' .. id)
return reply
