-- Records partial output of a step attempt as a `step.progress` event, if the attempt is
-- current and the reporting worker holds it (the same fencing as report.lua), within the
-- task's progress budget. Progress goes to the task's events only, not the operators'.
-- KEYS[1] task hash
-- ARGV[1] prefix   ARGV[2] task id   ARGV[3] step   ARGV[4] attempt   ARGV[5] worker
-- ARGV[6] the messages, a JSON array
-- Returns {'outcome', 'recorded' | 'discarded' | 'limited'}
local step = ARGV[3]
local v = redis.call('HMGET', KEYS[1], F.status, at_step(step, S.status),
  at_step(step, S.attempt), at_step(step, S.worker), F.progress_events, at_step(step, S.id),
  F.event_count, F.watched_until)
if not v[1] or terminal(v[1]) or v[2] ~= 'dispatched' or v[3] ~= ARGV[4] or v[4] ~= ARGV[5] then
  return {'outcome', 'discarded'}
end
local n = tonumber(v[5] or '0')
if n >= MAX_PROGRESS_EVENTS then return {'outcome', 'limited'} end
local now = now_ms()
local events = {ev_step('step.progress', v[6], step) .. ',"attempt":' .. ARGV[4] ..
  ',"worker_id":' .. cjson.encode(ARGV[5]) .. ',"messages":' .. ARGV[6] .. '}'}
local update = {F.progress_events, tostring(n + 1)}
local count = ev_fields(update, v[7], events, now)
redis.call('HSET', KEYS[1], unpack(update))
ev_trim(KEYS[1], count)
-- Partial output stays out of the operators' stream; watchers are woken.
ev_announce(ARGV[1], ARGV[2], events, v[8], now, nil)
return {'outcome', 'recorded'}
