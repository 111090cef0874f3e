-- Fires wait and sleep timers that are due, oldest first (docs/workflows.md, rule 13): a
-- sleep succeeds with null; a wait times out (fails for good, or succeeds with
-- {"timed_out": true}). A timer whose step no longer waits (signalled, cancelled) or whose
-- task is gone is dropped.
-- KEYS[1] the timers set   KEYS[2] the operators' event stream, while it records
-- ARGV[1] prefix   ARGV[2] most timers to fire   ARGV[3] retention ms
-- Returns one row per timer that fired:
--   {'task_id', id, 'step', n[, 'queued', caps][, 'status', s, 'callback', c, ...]}
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', int(now), 'LIMIT', 0,
  tonumber(ARGV[2]))
local rows = {}
for _, m in ipairs(due) do
  redis.call('ZREM', KEYS[1], m)
  local id, step = split_member(m)
  local slot = tonumber(step)
  g_begin(ARGV[1], id, task_key(ARGV[1], id), now, KEYS[2])
  local v = g_read({F.status, at(slot, 'status'), at(slot, 'kind'), at(slot, 'on_timeout'),
    at(slot, 'signal'), at(slot, 'wait_ms'), F.budget_tokens, F.budget_cost_nanos,
    F.event_count, F.watched_until, F.created_at})
  if v[1] and not terminal(v[1]) and v[2] == 'waiting' then
    g_del(at(slot, 'wakes_at'))
    if v[3] == 'sleep' or v[4] == 'continue' then
      local output = 'null'
      if v[3] ~= 'sleep' then output = '{"timed_out":true}' end
      g_set(at(slot, 'status'), 'succeeded')
      g_set(at(slot, 'output'), output)
      g_set(at(slot, 'finished_at'), int(now))
      finish(slot, 'succeeded')
    else
      fail_for_good(slot, error_json('wait_timeout', 'no signal `' .. (v[5] or '') ..
        '` within ' .. (v[6] or '?') .. ' ms'))
    end
    local row = {'task_id', id, 'step', step}
    for _, x in ipairs(g_end(nil, ARGV[3])) do row[#row + 1] = x end
    rows[#rows + 1] = row
  end
end
return rows
