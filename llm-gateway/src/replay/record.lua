-- Records the answer of a claimed request, for replay.
-- KEYS[1]  the record (see claim.lua)
-- ARGV[1]  the claim's token
-- ARGV[2]  the request's fingerprint
-- ARGV[3]  the answer (JSON)
-- ARGV[4]  how long to keep it, in ms
-- Returns  1 when recorded; 0 when another request holds the key now. A claim that
--          expired during a long answer is recorded anyway when nobody took the key since.
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner ~= ARGV[1] and redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'fp', ARGV[2], 'answer', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
