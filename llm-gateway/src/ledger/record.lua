-- Records one answered call, in one atomic step: on the day's hash, under the key and the
-- provider model that served it and in the key's day totals; and, when the call serves a
-- task, in the task's totals and its step's. A task hash this creates gets a TTL; one that
-- existed before (the master made it at submit to hold a budget) is left without, as the
-- master gives it the task's retention when the task ends.
-- KEYS[1] the day's hash   KEYS[2] the task's usage hash (absent: no task)
-- ARGV[1] `<key>|<provider>/<model>|`   ARGV[2] `<key>|`   ARGV[3] prompt tokens
-- ARGV[4] completion tokens   ARGV[5] cost in nano-dollars
-- ARGV[6] unix seconds when the day's hash expires
-- ARGV[7] `step:<step>:`, or '' for no step   ARGV[8] TTL in seconds of a new task hash
-- Returns 1.
local function add(key, prefix)
  redis.call('HINCRBY', key, prefix .. 'in', ARGV[3])
  redis.call('HINCRBY', key, prefix .. 'out', ARGV[4])
  redis.call('HINCRBY', key, prefix .. 'cost_nanos', ARGV[5])
  redis.call('HINCRBY', key, prefix .. 'calls', 1)
end
add(KEYS[1], ARGV[1])
add(KEYS[1], ARGV[2])
redis.call('EXPIREAT', KEYS[1], ARGV[6])
if KEYS[2] then
  local existed = redis.call('EXISTS', KEYS[2])
  add(KEYS[2], '')
  if ARGV[7] ~= '' then add(KEYS[2], ARGV[7]) end
  if existed == 0 then redis.call('EXPIRE', KEYS[2], ARGV[8]) end
end
return 1
