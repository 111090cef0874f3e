-- Extends leases whose workers still list the step as in flight (only existing entries).
-- KEYS[1] the capability's lease set
-- ARGV[1] lease ms   ARGV[2 ..] members (task_id:step)
local until_ms = int(now_ms() + tonumber(ARGV[1]))
local args = {'XX'}
for i = 2, #ARGV do
  args[#args + 1] = until_ms
  args[#args + 1] = ARGV[i]
end
if #args > 1 then redis.call('ZADD', KEYS[1], unpack(args)) end
return #ARGV - 1
