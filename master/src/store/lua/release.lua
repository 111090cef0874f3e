-- Puts a claimed step back at its place in the queue without spending an attempt: the
-- worker never took it. A no-op unless the attempt is current. Refusals for capacity (429,
-- draining) are free without limit; of a step's failed dispatches (5xx, connection errors)
-- ARGV[6] are free and the next one is not: the step is left dispatched, the count starts
-- again, and the caller spends the attempt by reporting a failure (so a step no worker can
-- take cannot loop). S.free_failures counts the free ones.
-- KEYS[1] task hash   KEYS[2] the operators' event stream, while it records
-- ARGV[1] prefix   ARGV[2] task id   ARGV[3] step   ARGV[4] attempt
-- ARGV[5] 'capacity' | 'failure'   ARGV[6] free failed dispatches before one spends an attempt
-- Returns {'outcome', 'released' | 'stale' (the attempt is not current)
--   | 'over_limit'}.
local step = ARGV[3]
local k = step_fields(step)
local v = redis.call('HMGET', KEYS[1], F.status, k.status, k.attempt, k.capability,
  k.worker, k.tries, F.priority, k.queued_at, k.free_failures, k.id, F.event_count,
  F.watched_until)
if not v[1] or terminal(v[1]) or v[2] ~= 'dispatched' or v[3] ~= ARGV[4] then
  return {'outcome', 'stale'}
end
local failures = tonumber(v[9] or '0')
if ARGV[5] == 'failure' then
  failures = failures + 1
  if failures > tonumber(ARGV[6]) then
    redis.call('HSET', KEYS[1], k.free_failures, '0')
    return {'outcome', 'over_limit'}
  end
end
local m = member(ARGV[2], step)
redis.call('ZREM', lease_key(ARGV[1], v[4]), m)
release_load(ARGV[1], v[5])
local tries = tonumber(v[6] or '1') - 1
if tries < 0 then tries = 0 end
local now = now_ms()
local events = {ev_step('step.queued', v[10], step) .. '}'}
local update = {k.status, 'queued', k.tries, tostring(tries), k.free_failures,
  tostring(failures)}
local n = ev_fields(update, v[11], events, now)
redis.call('HSET', KEYS[1], unpack(update))
ev_trim(KEYS[1], n)
ev_announce(ARGV[1], ARGV[2], events, v[12], now, KEYS[2])
redis.call('ZADD', queue_key(ARGV[1], v[4]), score(v[7], v[8]), m)
return {'outcome', 'released'}
