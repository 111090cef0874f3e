-- Claims queued steps of one capability for workers, highest priority first: raises each
-- step's attempt (the fencing token), leases it and counts it against its worker. A step
-- whose last attempt was lost on a worker (lease lapsed, dispatch refused) goes to another
-- worker of the batch when there is one.
-- KEYS[1] the capability's queue   KEYS[2] its lease set   KEYS[3] worker load hash
-- KEYS[4] the operators' event stream, while it records (lib.lua: ev_announce)
-- ARGV[1] prefix   ARGV[2] lease ms   ARGV[3 ..] worker ids, one per step wanted
-- Returns one row per claimed step:
--   {'task_id', id, 'step', n, 'attempt', n, 'worker', id, 'timeout_ms', ms,
--    'total_steps', n, 'request_id', id, 'input', json, 'step_id', id,
--    ['traceparent', w3c,]
--    ['pipeline', name,] ['element', json, 'element_index', n,]
--    ['needs', {{slot, id, capability or '', status, output or '', error or ''}, ...}]}
-- A step carries the task input and the outcomes of the steps it needs (a map instance:
-- its element and its map step's needs), never the whole history, so a request to a
-- worker does not grow with the pipeline's length. In a chain the step before is read
-- with the step's own fields (one HMGET); other needs with one more.
local now = now_ms()
local lease_until = int(now + tonumber(ARGV[2]))
local pool = {}
for i = 3, #ARGV do pool[#pool + 1] = ARGV[i] end
local next_worker = 1
-- The next worker of the batch, preferring one that is not `avoid`.
local function take(avoid)
  if avoid then
    for j = next_worker, #pool do
      if pool[j] ~= avoid then
        pool[next_worker], pool[j] = pool[j], pool[next_worker]
        break
      end
    end
  end
  local worker = pool[next_worker]
  next_worker = next_worker + 1
  return worker
end
local CLAIM_FIELDS = {'status', 'attempt', 'tries', 'timeout_ms', 'avoid_worker', 'needs',
  'id', 'element', 'element_index', 'worker', 'dispatched_at'}
local claimed = {}
while #claimed < #pool do
  local popped = redis.call('ZPOPMIN', KEYS[1], #pool - #claimed)
  if #popped == 0 then break end
  for i = 1, #popped, 2 do
    local m = popped[i]
    local id, step = split_member(m)
    local s = tonumber(step)
    local tkey = task_key(ARGV[1], id)
    -- Only the fields a claim uses (step_fields would build all of them, per step).
    local k = {}
    for j = 1, #CLAIM_FIELDS do
      local name = CLAIM_FIELDS[j]
      k[name] = at_step(step, S[name])
    end
    local fields = {F.status, k.status, k.attempt, k.tries, k.timeout_ms, F.pipeline,
      F.declared, F.step_count, F.request_id, F.input, k.avoid_worker, k.needs, k.id,
      k.element, k.element_index, F.event_count, F.watched_until, F.traceparent}
    if s > 0 then
      for _, name in ipairs({'id', 'capability', 'status', 'output', 'error'}) do
        fields[#fields + 1] = at_step(s - 1, S[name])
      end
    end
    local v = redis.call('HMGET', tkey, unpack(fields))
    if (v[1] == 'queued' or v[1] == 'running') and v[2] == 'queued' then
      local worker = take(v[11])
      local attempt = tostring(tonumber(v[3] or '0') + 1)
      local update = {F.status, 'running', k.status, 'dispatched', k.attempt, attempt,
        k.tries, tostring(tonumber(v[4] or '0') + 1), k.worker, worker,
        k.dispatched_at, int(now)}
      if v[1] == 'queued' then
        update[#update + 1] = F.started_at
        update[#update + 1] = int(now)
      end
      local events = {ev_step('step.dispatched', v[13], step) .. ',"attempt":' .. attempt ..
        ',"worker_id":' .. cjson.encode(worker) .. '}'}
      local n = ev_fields(update, v[16], events, now)
      redis.call('HSET', tkey, unpack(update))
      ev_trim(tkey, n)
      ev_announce(ARGV[1], id, events, v[17], now, KEYS[4])
      redis.call('ZADD', KEYS[2], lease_until, m)
      redis.call('HINCRBY', KEYS[3], worker, 1)
      local row = {'task_id', id, 'step', step, 'attempt', attempt, 'worker', worker,
        'timeout_ms', v[5] or '0', 'total_steps', v[7] or v[8] or '1',
        'request_id', v[9] or '', 'input', v[10] or 'null', 'step_id', v[13] or ''}
      if v[6] then
        row[#row + 1] = 'pipeline'
        row[#row + 1] = v[6]
      end
      if v[18] then
        row[#row + 1] = 'traceparent'
        row[#row + 1] = v[18]
      end
      if v[14] then
        row[#row + 1] = 'element'
        row[#row + 1] = v[14]
        row[#row + 1] = 'element_index'
        row[#row + 1] = v[15] or '0'
      end
      local needs = split_commas(v[12])
      -- A task stored before graphs is a chain.
      if not v[7] and s > 0 then needs = {tostring(s - 1)} end
      if #needs > 0 then
        local rows = {}
        if #needs == 1 and tonumber(needs[1]) == s - 1 then
          rows[1] = {tostring(s - 1), v[19] or '', v[20] or '', v[21] or 'pending',
            v[22] or '', v[23] or ''}
        else
          local nf = {}
          for _, n in ipairs(needs) do
            for _, name in ipairs({'id', 'capability', 'status', 'output', 'error'}) do
              nf[#nf + 1] = at_step(n, S[name])
            end
          end
          local nv = redis.call('HMGET', tkey, unpack(nf))
          for i, n in ipairs(needs) do
            local b = (i - 1) * 5
            rows[i] = {n, nv[b + 1] or '', nv[b + 2] or '', nv[b + 3] or 'pending',
              nv[b + 4] or '', nv[b + 5] or ''}
          end
        end
        row[#row + 1] = 'needs'
        row[#row + 1] = rows
      end
      claimed[#claimed + 1] = row
    end
  end
end
return claimed
