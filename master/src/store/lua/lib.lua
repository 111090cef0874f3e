-- Helpers prepended to every master script, after the names generated from
-- store/schema.rs (`F`, `S`, the key builders; see schema::lua_prelude).
-- The time of a call in ms: the master's clock, given as every call's last argument
-- (store/redis.rs: Call) and taken off ARGV before the script runs (`call_begins`), so no
-- script spends a command on TIME. The replicas' clocks are NTP-synced; what a few ms of
-- skew could move (a lease of seconds, a retry's delay, the order of two submits in the
-- search index) tolerates it. Without it (a test's snippet), Redis's clock.
local call_now = nil
local function call_begins(ARGV)
  call_now = tonumber(ARGV[#ARGV])
  ARGV[#ARGV] = nil
end
local function now_ms()
  if call_now then return call_now end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Integers as exact decimal text (Lua's default formatting keeps only 14 digits). `%.0f`
-- of a 13-digit time costs about 4,000 instructions in libc's float printing, `%d` a tenth
-- of that, and a script formats the same `now` several times: the last one is kept.
local int_of, int_text = nil, nil
local function int(x)
  if x ~= int_of then
    if type(x) == 'number' and x == math.floor(x) and x > -1e15 and x < 1e15 then
      int_text = string.format('%d', x)
    else
      int_text = string.format('%.0f', x)
    end
    int_of = x
  end
  return int_text
end
-- A time as the task index keeps it (schema::index::pad_ms): 13 digits, zero-padded.
local function pad_ms(ms)
  local text = int(math.min(tonumber(ms or '0'), 9999999999999))
  return string.rep('0', 13 - #text) .. text
end
-- Step field names (`at_step`), kept while the library is loaded: building `3:st` anew
-- converts the number with sprintf and makes a new string, and one transition builds
-- dozens of names. Bounded: past AT_CACHE_MAX names the cache starts over.
local build_at_step = at_step
local AT_CACHE_MAX = 20000
local at_cache, at_cached = {}, 0
at_step = function(step, field)
  local names = at_cache[field]
  local name = names and names[step]
  if name then return name end
  name = build_at_step(step, field)
  if at_cached >= AT_CACHE_MAX then at_cache, at_cached = {}, 0 end
  names = at_cache[field]
  if not names then
    names = {}
    at_cache[field] = names
  end
  names[step] = name
  at_cached = at_cached + 1
  return name
end
-- Higher priority first, then first queued first (store/mod.rs: queue_score).
local function score(priority, queued)
  return int(-tonumber(priority or '0') * PRIORITY_WEIGHT + (tonumber(queued or '0') - SCORE_EPOCH_MS))
end
-- The task id and step of a queue member (schema::keys::member).
local function split_member(m)
  local sep = string.find(m, MEMBER_SEPARATOR, 1, true)
  return string.sub(m, 1, sep - 1), string.sub(m, sep + 1)
end
-- Step `i`'s field names: `step_fields(i).status` is `at_step(i, S.status)`.
local function step_fields(i)
  local out = {}
  for name, field in pairs(S) do out[name] = at_step(i, field) end
  if GUARDED then return setmetatable(out, getmetatable(S)) end
  return out
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
-- delivery record (see callback_claim.lua).
local function queue_callback(prefix, task, id, now)
  redis.call('HSET', task, F.callback_status, 'pending', F.callback_attempts, '0')
  redis.call('HDEL', task, F.callback_error)
  redis.call('ZADD', callbacks_key(prefix), int(now), id)
end
-- Task events (docs/events.md). An event is a JSON object as text; one transition's events
-- go to the task's stream as one entry, and (but partial output) to the operators' stream.
local function ev_value(name, text)
  if not text then return '' end
  if #text > MAX_EVENT_VALUE_BYTES then return ',"truncated":true' end
  return ',"' .. name .. '":' .. text
end
local function ev_step(kind, id, slot)
  return '{"type":"' .. kind .. '","step":' .. cjson.encode(id or '') .. ',"slot":' .. slot
end
-- One transition's events as the task's hash keeps them: `<ms> [event, …]`.
local function ev_entry(list, now)
  return int(now) .. ' [' .. table.concat(list, ',') .. ']'
end
-- Adds the next entry of the task's events (its count was `count`) to `update`, a list of
-- HSET field/value arguments; returns the entry's number.
local function ev_fields(update, count, list, now)
  local n = tonumber(count or '0') + 1
  update[#update + 1] = event_field(n)
  update[#update + 1] = ev_entry(list, now)
  update[#update + 1] = F.event_count
  update[#update + 1] = tostring(n)
  return n
end
-- Beyond MAX_TASK_EVENTS entries, the oldest goes.
local function ev_trim(key, n)
  if n > MAX_TASK_EVENTS then redis.call('HDEL', key, event_field(n - MAX_TASK_EVENTS)) end
end
-- Hands a transition's events on: to the operators' stream `firehose` (its key, given to
-- the script as its last key only while someone follows that stream; nil otherwise), and
-- a wake-up on the events channel while someone follows the task (`watched`: until when,
-- from F.watched_until).
local function ev_announce(prefix, id, list, watched, now, firehose)
  if firehose then
    redis.call('XADD', firehose, 'MAXLEN', '~', FIREHOSE_EVENTS, '*',
      FIREHOSE_TASK, id, FIREHOSE_FIELD, '[' .. table.concat(list, ',') .. ']')
  end
  if watched and tonumber(watched) and tonumber(watched) > now then
    redis.call('PUBLISH', events_channel(prefix), announcement(id))
  end
end
