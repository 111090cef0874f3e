-- The live workers' ids and record expiries, without their records: a reader that keeps
-- the records it has read fetches only those whose expiry moved (each heartbeat moves it).
-- KEYS[1]  the live-workers sorted set (member: worker id, score: expiry in ms)
-- Returns a flat list: worker id, expiry, worker id, expiry, … (live ones only; the full
-- read, live.lua, drops the expired from the set).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES')
