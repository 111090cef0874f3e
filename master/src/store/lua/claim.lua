-- Claims queued steps of one capability for workers, highest priority first: raises each
-- step's attempt (the fencing token), leases it and counts it against its worker. A step
-- whose last attempt was lost on a worker (lease lapsed, dispatch refused) goes to another
-- worker of the batch when there is one.
-- KEYS[1] the capability's queue   KEYS[2] its lease set   KEYS[3] worker load hash
-- ARGV[1] prefix   ARGV[2] lease ms   ARGV[3 ..] worker ids, one per step wanted
-- Returns one row per claimed step:
--   {'task_id', id, 'step', n, 'attempt', n, 'worker', id, 'timeout_ms', ms,
--    'total_steps', n, 'capabilities', caps, 'request_id', id, 'input', json,
--    ['pipeline', name,] ['previous_output', json of the step before (step > 0)]}
-- A step carries the task input and the output of the step before it, never the whole
-- history, so a request to a worker does not grow with the pipeline's length.
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
local claimed = {}
while #claimed < #pool do
  local popped = redis.call('ZPOPMIN', KEYS[1], #pool - #claimed)
  if #popped == 0 then break end
  for i = 1, #popped, 2 do
    local m = popped[i]
    local id, step = split_member(m)
    local s = tonumber(step)
    local tkey = task_key(ARGV[1], id)
    local k = step_fields(step)
    local fields = {F.status, k.status, k.attempt, k.tries, k.timeout_ms, F.pipeline,
      F.step_count, F.capabilities, F.request_id, F.input, k.avoid_worker}
    if s > 0 then fields[#fields + 1] = at_step(s - 1, S.output) end
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
      redis.call('HSET', tkey, unpack(update))
      redis.call('ZADD', KEYS[2], lease_until, m)
      redis.call('HINCRBY', KEYS[3], worker, 1)
      local row = {'task_id', id, 'step', step, 'attempt', attempt, 'worker', worker,
        'timeout_ms', v[5] or '0', 'total_steps', v[7] or '1', 'capabilities', v[8] or '',
        'request_id', v[9] or '', 'input', v[10] or 'null'}
      if v[6] then
        row[#row + 1] = 'pipeline'
        row[#row + 1] = v[6]
      end
      if s > 0 then
        row[#row + 1] = 'previous_output'
        row[#row + 1] = v[12] or 'null'
      end
      claimed[#claimed + 1] = row
    end
  end
end
return claimed
