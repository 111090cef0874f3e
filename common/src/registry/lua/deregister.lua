-- Removes a worker at once (drain on SIGTERM), so no dispatcher picks it again.
-- KEYS[1]  the worker's record key
-- KEYS[2]  the live-workers sorted set
-- ARGV[1]  the worker id
-- ARGV[2]  the events channel
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[2], 'gone:' .. ARGV[1])
return 1
