-- Dispatch a batch of jobs into one partition. Checks, before any write, in
-- SPEC's order: idempotency keys (a repeat returns the first job), the agent
-- is known, no job id exists yet, the queue-depth cap (the whole batch fits
-- or nothing is written).
local meta, counts, log, delayed = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ready = { h = KEYS[5], n = KEYS[6], l = KEYS[7] }
local timers = KEYS[8]
local max_depth = tonumber(ARGV[1])
local actor = ARGV[2]
local idem_ttl = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
-- Per job i (from 1): KEYS[9 + 3(i-1)] its record, then its idempotency key,
-- then its dependency set; ARGV[5 + 7(i-1)] job id, spec JSON, max attempts,
-- priority code, delay ms, has-idempotency-key flag ('1'/'0'), its dependency
-- ids separated by spaces ('' for none).

local outcome = {}
local new_jobs, fresh = 0, 0
local batch_keys = {}  -- idempotency key -> the job of this batch that claims it
for i = 1, n do
  local k, a = 9 + 3 * (i - 1), 5 + 7 * (i - 1)
  local existing = false
  if ARGV[a + 5] == '1' then
    existing = redis.call('GET', KEYS[k + 1]) or batch_keys[KEYS[k + 1]] or false
    if not existing then batch_keys[KEYS[k + 1]] = ARGV[a] end
  end
  if existing then
    outcome[i] = existing
  else
    if redis.call('EXISTS', KEYS[k]) == 1 then
      return { 'invalid_state', ARGV[a] }
    end
    outcome[i] = false
    new_jobs = new_jobs + 1
    -- Jobs that wait for dependencies are not pending yet: the cap leaves them.
    if ARGV[a + 6] == '' then
      fresh = fresh + 1
    end
  end
end

if new_jobs > 0 and redis.call('EXISTS', meta) == 0 then
  return { 'unknown_agent' }
end

if max_depth > 0 and fresh > 0 then
  local c = redis.call('HMGET', counts, 'queued', 'delayed', 'active')
  local pending = (tonumber(c[1]) or 0) + (tonumber(c[2]) or 0) + (tonumber(c[3]) or 0)
  if pending + fresh > max_depth then
    return { 'queue_full', pending, max_depth }
  end
end

local now = aq_now_us()
local reply = { 'ok', aq_int(now) }
local added = {}  -- state -> jobs of this batch that start in it
for i = 1, n do
  local k, a = 9 + 3 * (i - 1), 5 + 7 * (i - 1)
  local job_id = ARGV[a]
  if outcome[i] then
    reply[#reply + 1] = outcome[i]
    reply[#reply + 1] = 'existing'
  else
    local job_key, spec, code, delay_ms = KEYS[k], ARGV[a + 1], ARGV[a + 3], tonumber(ARGV[a + 4])
    local state, head
    local fields = { 'spec', spec, 'maxAttempts', ARGV[a + 2], 'attempt', '0', 'budgetFrom', '0',
      'prio', code, 'createdAt', aq_int(now) }
    if ARGV[a + 6] ~= '' then
      state = 'waiting_dependencies'
      head = '{"state":"waiting_dependencies"'
      if delay_ms > 0 then
        -- The delay counts from the dispatch; the release honours what is left.
        local run_at = now + delay_ms * 1000
        head = head .. ',"runAt":' .. aq_int(run_at)
        fields[#fields + 1] = 'runAt'
        fields[#fields + 1] = aq_int(run_at)
      end
      for dep in string.gmatch(ARGV[a + 6], '%S+') do
        redis.call('SADD', KEYS[k + 2], dep)
      end
    elseif delay_ms > 0 then
      local run_at = now + delay_ms * 1000
      state = 'delayed'
      head = '{"state":"delayed","runAt":' .. aq_int(run_at)
      fields[#fields + 1] = 'runAt'
      fields[#fields + 1] = aq_int(run_at)
      aq_delay(delayed, timers, job_id, run_at)
    else
      state = 'queued'
      head = '{"state":"queued"'
      fields[#fields + 1] = 'queuedAt'
      fields[#fields + 1] = aq_int(now)
      redis.call('XADD', ready[code], '*', 'j', job_id)
    end
    -- A new record: its first event id is written with the rest, not appended.
    local event_id = redis.call('XADD', log, '*', 'type', 'JobDispatched', 'jobId', job_id,
      'v', '1', 'at', aq_int(now), 'actor', actor, 'data', head .. ',' .. string.sub(spec, 2))
    fields[#fields + 1] = 'state'
    fields[#fields + 1] = state
    fields[#fields + 1] = 'events'
    fields[#fields + 1] = event_id
    redis.call('HSET', job_key, unpack(fields))
    added[state] = (added[state] or 0) + 1
    if ARGV[a + 5] == '1' then
      redis.call('SET', KEYS[k + 1], job_id, 'EX', idem_ttl)
    end
    reply[#reply + 1] = job_id
    reply[#reply + 1] = state
  end
end
for state, n_added in pairs(added) do
  redis.call('HINCRBY', counts, state, n_added)
end
return reply
