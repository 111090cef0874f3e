-- Claims an Idempotency-Key for a request, or says what the key already holds.
-- KEYS[1]  the record: a hash with `fp` (the request's fingerprint), `owner` (the claim's
--          token, while the first request is being answered) and `answer` (once answered)
-- ARGV[1]  the request's fingerprint
-- ARGV[2]  a token naming this claim (release.lua and record.lua check it)
-- ARGV[3]  the claim's TTL in ms: a gateway that dies mid-request frees the key by then
-- Returns  {'claimed'} | {'recorded', answer} | {'reused'} | {'in_progress'}
local fp = redis.call('HGET', KEYS[1], 'fp')
if not fp then
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'owner', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'claimed'}
end
if fp ~= ARGV[1] then
  return {'reused'}
end
local answer = redis.call('HGET', KEYS[1], 'answer')
if answer then
  return {'recorded', answer}
end
return {'in_progress'}
