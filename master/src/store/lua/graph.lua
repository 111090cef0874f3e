-- The graph transitions of docs/workflows.md ("The transitions, precisely"), prepended
-- after lib.lua to the scripts that finish, start or stop steps (submit, report, signal,
-- timers, cancel, redrive). A transition reads the task hash through a cache (one HMGET
-- for each batch of fields not read yet) and writes it once at the end (g_flush: one
-- HSET, one HDEL), so a chain costs what it did before graphs, and what an earlier part
-- of a cascade wrote is what a later part reads.
local G = {}
-- Most values given to one command: Lua's unpack stops at a few thousand.
local CHUNK = 1000

-- Starts a transition on task `id` (hash `key`) at `now` (ms). `firehose`: the operators'
-- stream's key when it records (lib.lua: ev_announce), else nil. `G.signal`, set by
-- signal.lua, is `{name, slot, buffered}` of a signal received, for its event.
local function g_begin(prefix, id, key, now, firehose)
  G = {prefix = prefix, id = id, key = key, now = now, cache = {}, writes = {}, order = {},
    dels = {}, queued = {}, queued_list = {}, failed = nil, succeeded = false,
    firehose = firehose}
end

-- Values of `fields` (a list of names), missing ones as nil; what is not cached yet is
-- read with one HMGET (unless G.complete: the cache holds the whole hash, at submit).
local function g_read(fields)
  local missing = {}
  for i = 1, #fields do
    local f = fields[i]
    if G.cache[f] == nil then missing[#missing + 1] = f end
  end
  if #missing > 0 and G.complete then
    for i = 1, #missing do G.cache[missing[i]] = false end
  elseif #missing > 0 then
    for first = 1, #missing, CHUNK do
      local last = math.min(first + CHUNK - 1, #missing)
      local v = redis.call('HMGET', G.key, unpack(missing, first, last))
      for j = first, last do G.cache[missing[j]] = v[j - first + 1] or false end
    end
  end
  local out = {}
  for i = 1, #fields do
    local c = G.cache[fields[i]]
    if c ~= false then out[i] = c end
  end
  return out
end

-- Seeds the cache with values read by the script itself (the same order as `fields`).
local function g_seed(fields, values)
  for i = 1, #fields do
    local f = fields[i]
    if G.cache[f] == nil then G.cache[f] = values[i] or false end
  end
end

local function g_set(field, value)
  G.cache[field] = value
  if G.writes[field] == nil then G.order[#G.order + 1] = field end
  G.writes[field] = value
  G.dels[field] = nil
end

local function g_del(field)
  G.cache[field] = false
  G.writes[field] = nil
  G.dels[field] = true
end

-- The events of what the transition wrote (docs/events.md), in the order it first wrote
-- each status: the task's first (submitted, redriven), its end last.
local STATUS_SUFFIX = at_step('', S.status)
local STEP_EVENT = {queued = 'step.queued', succeeded = 'step.succeeded',
  failed = 'step.failed', waiting = 'step.waiting', skipped = 'step.skipped',
  cancelled = 'step.cancelled'}
local function g_events()
  local slots, task_status = {}, nil
  local order = G.order
  for i = 1, #order do
    local f = order[i]
    local v = G.writes[f]
    if v == nil then
    elseif f == F.status then
      task_status = v
    elseif STEP_EVENT[v] and string.sub(f, -#STATUS_SUFFIX) == STATUS_SUFFIX then
      local slot = string.sub(f, 1, #f - #STATUS_SUFFIX)
      if string.find(slot, '^%d+$') then slots[#slots + 1] = {slot, v} end
    end
  end
  local list = {}
  if G.complete then
    list[1] = '{"type":"task.submitted"}'
  elseif G.redriven then
    list[1] = '{"type":"task.redriven"}'
  end
  -- Step ids and attempts, the entry count and the watch: read with what the transition
  -- read (one HMGET for what it did not).
  local fields = {F.event_count, F.watched_until}
  if G.signal then fields[#fields + 1] = at_step(G.signal.slot, S.id) end
  for _, s in ipairs(slots) do
    fields[#fields + 1] = at_step(s[1], S.id)
    fields[#fields + 1] = at_step(s[1], S.attempt)
  end
  local known = g_read(fields)
  -- Before the step events: the signal is why its wait step succeeds.
  if G.signal then
    local g = G.signal
    list[#list + 1] = ev_step('signal.received', known[3], g.slot) .. ',"signal":' ..
      cjson.encode(g.name) .. (g.buffered and ',"buffered":true' or '') .. '}'
  end
  local base = G.signal and 3 or 2
  for i, s in ipairs(slots) do
    local slot, st = s[1], s[2]
    local id, attempt = known[base + 2 * i - 1], known[base + 2 * i]
    local w = function(name) return G.writes[at_step(slot, S[name])] end
    local kind = STEP_EVENT[st]
    local extra = ''
    if st == 'queued' and tonumber(w('queued_at') or '0') > G.now then
      kind = 'step.retrying'
      extra = ',"due_at_ms":' .. w('queued_at') .. ev_value('error', w('error'))
    elseif st == 'succeeded' then
      extra = ev_value('output', w('output'))
    elseif st == 'failed' or st == 'cancelled' then
      extra = ev_value('error', w('error'))
    elseif st == 'waiting' then
      extra = ',"due_at_ms":' .. (w('wakes_at') or '0')
    end
    if attempt and st ~= 'queued' or kind == 'step.retrying' then
      extra = ',"attempt":' .. (attempt or '0') .. extra
    end
    list[#list + 1] = ev_step(kind, id, slot) .. extra .. '}'
  end
  if task_status and terminal(task_status) then
    local extra = ''
    if task_status == 'succeeded' then
      extra = ev_value('output', G.result)
    elseif task_status == 'failed' then
      extra = ev_value('error', G.writes[F.error])
    end
    list[#list + 1] = '{"type":"task.' .. task_status .. '"' .. extra .. '}'
  end
  if #list == 0 then return end
  local n = tonumber(known[1] or '0') + 1
  g_set(event_field(n), ev_entry(list, G.now))
  g_set(F.event_count, tostring(n))
  if n > MAX_TASK_EVENTS then g_del(event_field(n - MAX_TASK_EVENTS)) end
  ev_announce(G.prefix, G.id, list, known[2], G.now, G.firehose)
end

-- Writes what the transition changed, and its events.
local function g_flush()
  g_events()
  local args, seen = {}, {}
  local order = G.order
  for i = 1, #order do
    local f = order[i]
    local v = G.writes[f]
    if v ~= nil and not seen[f] then
      seen[f] = true
      args[#args + 1] = f
      args[#args + 1] = v
    end
  end
  -- In pieces: Lua's unpack takes a few thousand values at most (a wide map writes more).
  for first = 1, #args, 2 * CHUNK do
    redis.call('HSET', G.key, unpack(args, first, math.min(first + 2 * CHUNK - 1, #args)))
  end
  local dels = {}
  for f in pairs(G.dels) do dels[#dels + 1] = f end
  for first = 1, #dels, CHUNK do
    redis.call('HDEL', G.key, unpack(dels, first, math.min(first + CHUNK - 1, #dels)))
  end
end

-- Field `name` (a key of S) of slot `slot`.
local function at(slot, name) return at_step(slot, S[name]) end

local function error_json(kind, message)
  return cjson.encode({message = message, retryable = false, kind = kind})
end

-- Queues a worker step (or map instance) of the task.
local function g_queue(slot)
  local v = g_read({at(slot, 'capability'), F.priority, at(slot, 'id'), at(slot, 'attempt')})
  local cap = v[1]
  g_set(at(slot, 'status'), 'queued')
  g_set(at(slot, 'queued_at'), int(G.now))
  redis.call('ZADD', queue_key(G.prefix, cap), score(v[2], G.now), member(G.id, slot))
  if not G.queued[cap] then
    G.queued[cap] = true
    G.queued_list[#G.queued_list + 1] = cap
  end
end

-- A wait or sleep step starts waiting for `ms`.
local function g_timer(slot, ms)
  local due = G.now + ms
  g_set(at(slot, 'status'), 'waiting')
  g_set(at(slot, 'wakes_at'), int(due))
  redis.call('ZADD', timers_key(G.prefix), int(due), member(G.id, slot))
  local t = g_read({F.status, F.started_at})
  if t[1] == 'queued' then
    g_set(F.status, 'running')
    if not t[2] then g_set(F.started_at, int(G.now)) end
  end
end

-- JSON text scanning for map arrays: elements are cut out of the text, never decoded and
-- encoded again, so they stay exactly as written (cjson would round numbers).
local function skip_ws(s, i) return string.find(s, '[^ \t\r\n]', i) end

-- The index of the last character of the JSON value that starts at `i`.
local function value_end(s, i)
  local c = string.sub(s, i, i)
  if c == '"' then
    local j = i + 1
    while true do
      local q = string.find(s, '["\\]', j)
      if not q then error('unterminated string') end
      if string.sub(s, q, q) == '\\' then j = q + 2 else return q end
    end
  elseif c == '{' or c == '[' then
    local depth, j = 0, i
    while true do
      local q = string.find(s, '[%[%]{}"]', j)
      if not q then error('unbalanced JSON') end
      local ch = string.sub(s, q, q)
      if ch == '"' then
        j = value_end(s, q) + 1
      else
        if ch == '[' or ch == '{' then depth = depth + 1 else depth = depth - 1 end
        if depth == 0 then return q end
        j = q + 1
      end
    end
  end
  local q = string.find(s, '[,%]} \t\r\n]', i)
  if q then return q - 1 end
  return #s
end

-- The members of the array or object at `i`: {first, last[, key]} each.
local function json_members(s, i)
  local open = string.sub(s, i, i)
  local out = {}
  local j = skip_ws(s, i + 1)
  local c = string.sub(s, j, j)
  if c == ']' or c == '}' then return out end
  while true do
    local m = {}
    if open == '{' then
      local key_end = value_end(s, j)
      m.key = cjson.decode(string.sub(s, j, key_end))
      j = skip_ws(s, skip_ws(s, key_end + 1) + 1)
    end
    m.first = j
    m.last = value_end(s, j)
    out[#out + 1] = m
    j = skip_ws(s, m.last + 1)
    if string.sub(s, j, j) ~= ',' then return out end
    j = skip_ws(s, j + 1)
  end
end

-- The texts of the elements of the array at `path` (keys and indices) in JSON text `s`,
-- or nil when no array is there.
local function json_elements(s, path)
  local i = skip_ws(s, 1)
  for _, seg in ipairs(path) do
    local c = string.sub(s, i, i)
    local found = nil
    if c == '{' then
      for _, m in ipairs(json_members(s, i)) do
        if m.key == seg then found = m end
      end
    elseif c == '[' then
      local n = tonumber(seg)
      if n and n >= 0 and n == math.floor(n) then found = json_members(s, i)[n + 1] end
    end
    if not found then return nil end
    i = found.first
  end
  if string.sub(s, i, i) ~= '[' then return nil end
  local out = {}
  for _, m in ipairs(json_members(s, i)) do out[#out + 1] = string.sub(s, m.first, m.last) end
  return out
end

local finish, ready, fail_for_good

-- A task stored before graphs (no F.declared) is a chain: its graph fields are derived
-- into the cache (and written with the transition), so tasks in flight during an upgrade
-- go on.
local function g_legacy()
  local t = g_read({F.declared, F.step_count})
  if t[1] or not t[2] then return end
  local n = tonumber(t[2])
  local fields = {}
  for i = 0, n - 1 do fields[#fields + 1] = at(i, 'status') end
  local st = g_read(fields)
  local open = 0
  for i = 0, n - 1 do
    if i + 1 < n then g_set(at(i, 'dependants'), tostring(i + 1)) end
    if i > 0 then
      g_set(at(i, 'needs'), tostring(i - 1))
      if st[i + 1] == 'pending' or st[i + 1] == nil then g_set(at(i, 'open_needs'), '1') end
    end
    g_set(at(i, 'id'), 'step-' .. i)
    if st[i + 1] ~= 'succeeded' then open = open + 1 end
  end
  g_set(F.declared, tostring(n))
  g_set(F.open, tostring(open))
  g_set(F.sinks, tostring(n - 1))
end

-- The task fails with error `err` because step `step_id` (capability `cap`, if any) failed
-- for good: dead-lettered; the other running branches are stopped by g_end.
local function fail_task(cap, err, step_id)
  if G.failed then return end
  G.failed = {error = err}
  g_set(F.status, 'failed')
  g_set(F.error, err)
  g_set(F.finished_at, int(G.now))
  if step_id then g_set(F.failed_step, step_id) end
  if cap then
    redis.call('ZADD', dead_key(G.prefix, cap), int(G.now), G.id)
    g_set(F.dead_capability, cap)
  end
end

-- A map instance finished: count it, queue the next one, and finish the map step when
-- every instance has.
local function instance_done(p)
  local v = g_read({at(p, 'map_done'), at(p, 'map_next'), at(p, 'map_count'),
    at(p, 'map_base'), at(p, 'status')})
  if v[5] ~= 'running' then return end
  local done = tonumber(v[1] or '0') + 1
  local nxt, n, base = tonumber(v[2] or '0'), tonumber(v[3] or '0'), tonumber(v[4] or '0')
  g_set(at(p, 'map_done'), tostring(done))
  if nxt < n and not G.failed then
    g_queue(base + nxt)
    g_set(at(p, 'map_next'), tostring(nxt + 1))
  end
  if done < n then return end
  local fields = {}
  for i = 0, n - 1 do
    fields[#fields + 1] = at(base + i, 'status')
    fields[#fields + 1] = at(base + i, 'output')
    fields[#fields + 1] = at(base + i, 'error')
  end
  local out = g_read(fields)
  local parts = {}
  local size = 0
  for i = 0, n - 1 do
    if out[3 * i + 1] == 'succeeded' then
      parts[#parts + 1] = out[3 * i + 2] or 'null'
    else
      parts[#parts + 1] = '{"error":' .. (out[3 * i + 3] or 'null') .. '}'
    end
    size = size + #parts[#parts] + 1
  end
  if size > MAX_MAP_OUTPUT_BYTES then
    return fail_for_good(p, error_json('map_output_too_large', 'the outputs of the ' .. n ..
      ' instances add up to ' .. size .. ' bytes; a map step\'s output is at most ' ..
      MAX_MAP_OUTPUT_BYTES))
  end
  g_set(at(p, 'status'), 'succeeded')
  g_set(at(p, 'output'), '[' .. table.concat(parts, ',') .. ']')
  g_set(at(p, 'finished_at'), int(G.now))
  finish(p, 'succeeded')
end

-- Slot `slot` failed for good with error JSON `err` (rule 8).
fail_for_good = function(slot, err)
  g_set(at(slot, 'status'), 'failed')
  g_set(at(slot, 'error'), err)
  g_set(at(slot, 'finished_at'), int(G.now))
  -- The step's id is read here with the rest (its event reads it from the cache).
  local v = g_read({at(slot, 'parent'), at(slot, 'allow_failure'), at(slot, 'capability'),
    at(slot, 'id')})
  if v[1] then
    local p = tonumber(v[1])
    if g_read({at(p, 'allow_failure')})[1] == '1' then return instance_done(p) end
    g_set(at(p, 'status'), 'failed')
    g_set(at(p, 'error'), err)
    g_set(at(p, 'finished_at'), int(G.now))
    return fail_task(v[3], err, v[4])
  end
  if v[2] == '1' then return finish(slot, 'failed') end
  fail_task(v[3], err, v[4])
end

-- Expands map step `m` over its array (rule 7).
local function expand(m)
  local v = g_read({at(m, 'map_from'), at(m, 'map_path'), at(m, 'map_over'),
    at(m, 'map_concurrency'), F.step_count, at(m, 'capability'), at(m, 'max_attempts'),
    at(m, 'timeout_ms'), at(m, 'id'), at(m, 'needs')})
  local text
  if v[1] == 'i' then
    text = g_read({F.input})[1]
  else
    text = g_read({at(tonumber(v[1]), 'output')})[1]
  end
  local ok, elements = pcall(json_elements, text or 'null', cjson.decode(v[2] or '[]'))
  if not ok or elements == nil then
    return fail_for_good(m, error_json('map_source',
      '`map.over` (' .. (v[3] or '') .. ') does not lead to an array'))
  end
  if #elements > MAX_MAP_WIDTH then
    return fail_for_good(m, error_json('map_too_wide', '`map.over` (' .. (v[3] or '') ..
      ') has ' .. #elements .. ' elements; a map step runs over at most ' .. MAX_MAP_WIDTH))
  end
  if #elements == 0 then
    g_set(at(m, 'status'), 'succeeded')
    g_set(at(m, 'output'), '[]')
    g_set(at(m, 'finished_at'), int(G.now))
    return finish(m, 'succeeded')
  end
  local base = tonumber(v[5])
  local n = #elements
  g_set(F.step_count, tostring(base + n))
  g_set(at(m, 'status'), 'running')
  g_set(at(m, 'map_base'), tostring(base))
  g_set(at(m, 'map_count'), tostring(n))
  g_set(at(m, 'map_done'), '0')
  for i = 1, n do
    local slot = base + i - 1
    g_set(at(slot, 'status'), 'pending')
    g_set(at(slot, 'capability'), v[6])
    g_set(at(slot, 'max_attempts'), v[7] or '1')
    g_set(at(slot, 'timeout_ms'), v[8] or '0')
    g_set(at(slot, 'id'), (v[9] or '') .. '[' .. (i - 1) .. ']')
    g_set(at(slot, 'parent'), tostring(m))
    g_set(at(slot, 'element'), elements[i])
    g_set(at(slot, 'element_index'), tostring(i - 1))
    if v[10] then g_set(at(slot, 'needs'), v[10]) end
  end
  local width = math.min(n, tonumber(v[4] or '16'))
  for i = 0, width - 1 do g_queue(base + i) end
  g_set(at(m, 'map_next'), tostring(width))
end

-- Slot `d` has all it needs (rule 6).
ready = function(d)
  if G.failed then return end
  local v = g_read({at(d, 'kind'), at(d, 'map_from'), at(d, 'signal'), at(d, 'wait_ms')})
  if v[1] == 'wait' then
    local buffered = buffered_field(v[3])
    local payload = g_read({buffered})[1]
    if payload then
      g_del(buffered)
      g_set(at(d, 'status'), 'succeeded')
      g_set(at(d, 'output'), payload)
      g_set(at(d, 'finished_at'), int(G.now))
      return finish(d, 'succeeded')
    end
    return g_timer(d, tonumber(v[4]))
  elseif v[1] == 'sleep' then
    return g_timer(d, tonumber(v[4]))
  elseif v[2] then
    return expand(d)
  end
  g_queue(d)
end

-- Slot `slot` finished as `outcome` (`succeeded`, `skipped`, or an allowed `failed`):
-- rule 4.
finish = function(slot, outcome)
  local parent = g_read({at(slot, 'parent')})[1]
  if parent then return instance_done(tonumber(parent)) end
  local t = g_read({F.open, at(slot, 'dependants')})
  g_set(F.open, tostring(tonumber(t[1] or '1') - 1))
  if G.failed then return end
  for _, part in ipairs(split_commas(t[2])) do
    local d = tonumber(part)
    local v = g_read({at(d, 'status'), at(d, 'open_needs'), at(d, 'skipped_needs'),
      at(d, 'routed_out'), at(d, 'needs'), at(d, 'kind'), at(d, 'capability'),
      at(d, 'map_from')})
    if v[1] == 'pending' or v[1] == nil then
      local open = tonumber(v[2] or '1') - 1
      local skipped = tonumber(v[3] or '0')
      g_set(at(d, 'open_needs'), tostring(open))
      if outcome == 'skipped' then
        skipped = skipped + 1
        g_set(at(d, 'skipped_needs'), tostring(skipped))
      end
      if open <= 0 then
        if v[4] == '1' or skipped >= #split_commas(v[5]) then
          g_set(at(d, 'status'), 'skipped')
          g_set(at(d, 'finished_at'), int(G.now))
          finish(d, 'skipped')
        else
          ready(d)
        end
      end
    end
  end
end

-- A router's output picks its successors (rule 2); false when the output does not.
local function route(slot, output)
  local ok, decoded = pcall(cjson.decode, output)
  local nxt = ok and type(decoded) == 'table' and decoded['next']
  local picks = {}
  local any = false
  if type(nxt) == 'string' then
    picks[nxt] = true
    any = true
  elseif type(nxt) == 'table' then
    for _, x in ipairs(nxt) do
      if type(x) == 'string' then
        picks[x] = true
        any = true
      end
    end
  end
  local deps = split_commas(g_read({at(slot, 'dependants')})[1])
  local fields = {}
  for i, d in ipairs(deps) do fields[i] = at(d, 'id') end
  local ids = g_read(fields)
  local known = {}
  for i = 1, #deps do known[ids[i] or ''] = deps[i] end
  for id in pairs(picks) do
    if not known[id] then
      fail_for_good(slot, error_json('route', 'the router picked `' .. id ..
        '`, which is not one of its successors'))
      return false
    end
  end
  if not any then
    fail_for_good(slot, error_json('route',
      'a router must answer an output with `next`: a successor id or a list of them'))
    return false
  end
  for i, d in ipairs(deps) do
    if not picks[ids[i] or ''] then g_set(at(d, 'routed_out'), '1') end
  end
  return true
end

-- Every slot that is queued, dispatched, waiting or running, except `except`, becomes
-- `cancelled` with error `err`: out of its queue, lease and timer.
local function stop_all(except, err)
  local n = tonumber(g_read({F.step_count})[1] or '0')
  local fields = {}
  for i = 0, n - 1 do fields[#fields + 1] = at(i, 'status') end
  local statuses = g_read(fields)
  for i = 0, n - 1 do
    local st = statuses[i + 1]
    if i ~= except and (st == 'queued' or st == 'dispatched' or st == 'waiting'
        or st == 'running') then
      local v = g_read({at(i, 'capability'), at(i, 'worker')})
      local m = member(G.id, i)
      if v[1] then
        redis.call('ZREM', queue_key(G.prefix, v[1]), m)
        redis.call('ZREM', delayed_key(G.prefix, v[1]), m)
        if redis.call('ZREM', lease_key(G.prefix, v[1]), m) == 1 then
          release_load(G.prefix, v[2])
        end
      end
      if st == 'waiting' then redis.call('ZREM', timers_key(G.prefix), m) end
      g_set(at(i, 'status'), 'cancelled')
      g_set(at(i, 'error'), err)
      g_set(at(i, 'finished_at'), int(G.now))
    end
  end
end

-- The result of a task that succeeded, unless it is the output of `reported` (the only
-- final step): graph_result in store/mod.rs.
local function g_result(reported)
  local sinks = split_commas(g_read({F.sinks})[1])
  if #sinks == 1 and tonumber(sinks[1]) == reported then return nil end
  if #sinks == 1 then return g_read({at(sinks[1], 'output')})[1] or 'null' end
  local fields = {}
  for _, s in ipairs(sinks) do
    fields[#fields + 1] = at(s, 'id')
    fields[#fields + 1] = at(s, 'status')
    fields[#fields + 1] = at(s, 'output')
  end
  local v = g_read(fields)
  local parts = {}
  for i = 1, #sinks do
    if v[3 * i - 1] ~= 'skipped' then
      parts[#parts + 1] = string.format('%s:%s', cjson.encode(v[3 * i - 2] or ''), v[3 * i] or 'null')
    end
  end
  return '{' .. table.concat(parts, ',') .. '}'
end

-- Ends a transition: stops the other branches of a task that failed, or finishes a task
-- with no open step; writes; queues the callback, sets the retention and announces a
-- finished task and puts it in the search index's status part. `reported` is the slot a
-- report was about (or nil). Returns the reply
-- fields about the task: {['queued', caps]} or {'status', s, 'callback', c[, 'result', r]
-- [, 'error', e]}; G.done is the task's final status, if it finished.
-- `before_write`, if given, is called with them before the hash is written (to add fields
-- to the same HSET).
local function g_end(reported, retention, before_write)
  local t = g_read({F.status, F.open, F.callback_url, F.budget_tokens, F.budget_cost_nanos,
    F.event_count, F.watched_until, F.created_at})
  local done = nil
  if G.failed then
    stop_all(reported or -1, cjson.encode({message =
      'stopped: another step of the task failed for good', retryable = false,
      kind = 'stopped'}))
    done = 'failed'
  elseif tonumber(t[2] or '1') <= 0 and not terminal(t[1]) then
    g_set(F.status, 'succeeded')
    g_set(F.finished_at, int(G.now))
    done = 'succeeded'
  end
  local out
  if done then
    local callback = '0'
    if t[3] then callback = '1' end
    out = {'status', done, 'callback', callback}
    if done == 'succeeded' then
      local result = g_result(reported)
      G.result = result or G.cache[at(reported, 'output')] or nil
      if result then
        out[#out + 1] = 'result'
        out[#out + 1] = result
      end
    else
      out[#out + 1] = 'error'
      out[#out + 1] = G.failed.error
    end
  else
    out = {}
    if #G.queued_list > 0 then out = {'queued', table.concat(G.queued_list, ',')} end
  end
  G.done = done
  if before_write then before_write(out) end
  g_flush()
  if done then
    if t[3] then queue_callback(G.prefix, G.key, G.id, G.now) end
    redis.call('PEXPIRE', G.key, retention)
    -- A budgeted task's usage hash was made at submit, with no expiry: it goes with the
    -- task. (Otherwise the gateway made it, with an expiry of its own.)
    if t[4] or t[5] then redis.call('PEXPIRE', usage_key(G.prefix, G.id), retention) end
    redis.call('ZADD', index_key(G.prefix), 0, ix_status(done, pad_ms(t[8]), G.id))
    redis.call('PUBLISH', events_channel(G.prefix), 'done:' .. G.id)
  end
  return out
end
