-- Frees a claimed Idempotency-Key whose request failed, so a retry calls the provider.
-- KEYS[1]  the record (see claim.lua)
-- ARGV[1]  the claim's token: a key claimed again since, or recorded, is left alone
-- Returns  1 when released, else 0
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
