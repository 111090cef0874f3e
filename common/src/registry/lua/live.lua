-- Drops expired workers from the live set and returns the live ones' records.
-- KEYS[1]  the live-workers sorted set
-- ARGV[1]  the record key prefix (record key = ARGV[1] .. worker id); records share the
--          set's hash tag, so this stays within one cluster slot
-- Returns a flat list: worker id, record JSON, worker id, record JSON, …
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
if #ids == 0 then
  return {}
end
local keys = {}
for i, id in ipairs(ids) do
  keys[i] = ARGV[1] .. id
end
local records = redis.call('MGET', unpack(keys))
local out = {}
for i, r in ipairs(records) do
  if r then
    out[#out + 1] = ids[i]
    out[#out + 1] = r
  end
end
return out
