-- Submits a task: idempotency, per-client rate limit (GCRA), the task hash, and the steps
-- that need nothing made ready (graph.lua: queued, waiting, or a map expanded), and the
-- task's members of the search index.
-- KEYS[1] task hash              KEYS[2] idempotency key (used when ARGV[6] == '1')
-- KEYS[3] rate-limit key         KEYS[4] set of capabilities seen in inline steps
-- KEYS[5] the operators' event stream, while it records (lib.lua: ev_announce)
-- ARGV[1] prefix   ARGV[2] task id   ARGV[3] rate per second (0 = no limit)   ARGV[4] burst
-- ARGV[5] retention ms   ARGV[6] '1' with an idempotency key   ARGV[7] priority (unused:
-- the hash's F.priority is read)
-- ARGV[8] k = capabilities to remember; ARGV[9 .. 8+k] those; ARGV[9+k] r = roots;
-- ARGV[10+k .. 9+k+r] the root slots; ARGV[10+k+r ..] field/value pairs of the task hash.
-- Returns {'outcome', 'created'[, 'queued', caps][, 'status', s, ...]}
--       | {'outcome', 'exists', 'task_id', id}
--       | {'outcome', 'limited', 'retry_after_ms', ms}
local now = now_ms()
if ARGV[6] == '1' then
  local existing = redis.call('GET', KEYS[2])
  if existing and redis.call('EXISTS', task_key(ARGV[1], existing)) == 1 then
    return {'outcome', 'exists', 'task_id', existing}
  end
end
local rate = tonumber(ARGV[3])
if rate > 0 then
  local interval = 1000 / rate
  local tolerance = interval * tonumber(ARGV[4])
  local tat = tonumber(redis.call('GET', KEYS[3]) or '0')
  if tat < now then tat = now end
  local new_tat = tat + interval
  if new_tat - now > tolerance then
    return {'outcome', 'limited', 'retry_after_ms', int(math.ceil(new_tat - now - tolerance))}
  end
  redis.call('SET', KEYS[3], string.format('%.3f', new_tat), 'PX', int(math.ceil(new_tat - now) + 1000))
end
if ARGV[6] == '1' then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[5])
end
local k = tonumber(ARGV[8])
if k > 0 then
  local caps = {}
  for i = 1, k do caps[i] = ARGV[8 + i] end
  redis.call('SADD', KEYS[4], unpack(caps))
end
local r = tonumber(ARGV[9 + k])
g_begin(ARGV[1], ARGV[2], KEYS[1], now, KEYS[5])
G.complete = true
-- The hash as given is written with the transition's one HSET, and read from the cache.
g_set(F.status, 'queued')
g_set(F.created_at, int(now))
for i = 10 + k + r, #ARGV, 2 do
  g_set(ARGV[i], ARGV[i + 1])
  -- The budget also goes where the llm-gateway checks it: the task's usage hash.
  if ARGV[i] == F.budget_tokens then
    redis.call('HSET', usage_key(ARGV[1], ARGV[2]), USAGE_BUDGET_TOKENS, ARGV[i + 1])
  elseif ARGV[i] == F.budget_cost_nanos then
    redis.call('HSET', usage_key(ARGV[1], ARGV[2]), USAGE_BUDGET_COST_NANOS, ARGV[i + 1])
  end
end
-- The task search index (schema::keys::task_index): every task, its client's, its pipeline's.
local who = g_read({F.client, F.pipeline})
local ms = pad_ms(now)
local entries = {0, ix_all(ms, ARGV[2], who[1] or '', who[2] or ''), 0, ix_client(who[1] or '', ms, ARGV[2])}
if who[2] then
  entries[#entries + 1] = 0
  entries[#entries + 1] = ix_pipeline(who[2], ms, ARGV[2])
end
redis.call('ZADD', index_key(ARGV[1]), unpack(entries))
for i = 10 + k, 9 + k + r do ready(tonumber(ARGV[i])) end
local reply = {'outcome', 'created'}
for _, x in ipairs(g_end(nil, ARGV[5])) do reply[#reply + 1] = x end
return reply
