-- Extends leases whose workers still list the step as in flight (only existing entries),
-- each to its own new expiry: the time of the heartbeat that listed it plus the lease.
-- KEYS[1] the capability's lease set
-- ARGV[1 ..] pairs: new expiry (ms since the epoch), member (task_id:step)
local args = {'XX'}
for i = 1, #ARGV, 2 do
  args[#args + 1] = ARGV[i]
  args[#args + 1] = ARGV[i + 1]
end
if #args > 1 then redis.call('ZADD', KEYS[1], unpack(args)) end
return (#args - 1) / 2
