-- Helpers prepended to every master script (see store/redis.rs). Key names must match
-- store/keys.rs.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function task_key(prefix, id) return prefix .. ':task:{' .. id .. '}' end
local function queue_key(prefix, cap) return prefix .. ':q:' .. cap end
local function delayed_key(prefix, cap) return prefix .. ':delayed:' .. cap end
local function lease_key(prefix, cap) return prefix .. ':lease:' .. cap end
local function dead_key(prefix, cap) return prefix .. ':dead:' .. cap end
local function load_key(prefix) return prefix .. ':wload' end
local function events_channel(prefix) return prefix .. ':events' end
local function callbacks_key(prefix) return prefix .. ':callbacks' end
-- Integers as exact decimal text (Lua's default formatting keeps only 14 digits).
local function int(x) return string.format('%.0f', x) end
-- Higher priority first, then first queued first (store/mod.rs: queue_score).
local function score(priority, queued)
  return int(-tonumber(priority or '0') * 1e13 + (tonumber(queued or '0') - 1735689600000))
end
local function split_member(member)
  local sep = string.find(member, ':', 1, true)
  return string.sub(member, 1, sep - 1), string.sub(member, sep + 1)
end
local function terminal(status)
  return status == 'succeeded' or status == 'failed' or status == 'cancelled'
end
local function split_commas(text)
  local out = {}
  for part in string.gmatch(text or '', '[^,]+') do out[#out + 1] = part end
  return out
end
local function release_load(prefix, worker)
  if worker and worker ~= '' then
    if redis.call('HINCRBY', load_key(prefix), worker, -1) <= 0 then
      redis.call('HDEL', load_key(prefix), worker)
    end
  end
end
-- Puts a finished task's completion callback in the outbox, due now, with a fresh
-- delivery record (`cbs` status, `cbn` attempts claimed, `cbe` last error; see
-- callback_claim.lua).
local function queue_callback(prefix, task, id, now)
  redis.call('HSET', task, 'cbs', 'pending', 'cbn', '0')
  redis.call('HDEL', task, 'cbe')
  redis.call('ZADD', callbacks_key(prefix), int(now), id)
end
