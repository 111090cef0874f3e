-- Reads, in one atomic step, the figures a call's budgets are checked against: the key's
-- totals of the day and, when the call serves a task, the task's totals and budget. The
-- gateway decides; this only reads, so a refused call changes nothing.
-- KEYS[1] the day's hash   KEYS[2] the task's usage hash (absent: no task)
-- ARGV[1] the key's total-field prefix (`<key>|`)
-- Returns {key in, key out, key cost_nanos,
--          task in, task out, task cost_nanos, task budget_tokens, task budget_cost_nanos}
-- as strings, '' where a field is absent (Lua cannot put nil in a reply's middle).
local function v(x) return x or '' end
local p = ARGV[1]
local day = redis.call('HMGET', KEYS[1], p .. 'in', p .. 'out', p .. 'cost_nanos')
local reply = {v(day[1]), v(day[2]), v(day[3]), '', '', '', '', ''}
if KEYS[2] then
  local task = redis.call('HMGET', KEYS[2], 'in', 'out', 'cost_nanos', 'budget_tokens',
    'budget_cost_nanos')
  for i = 1, 5 do reply[3 + i] = v(task[i]) end
end
return reply
