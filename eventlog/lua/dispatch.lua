-- Dispatch a batch of jobs into one partition. Checks, before any write, in
-- SPEC's order: idempotency keys (a repeat returns the first job), the agent
-- is known, no job id exists yet, the queue-depth cap (the whole batch fits
-- or nothing is written).
local meta, counts, log, delayed = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ready = { h = KEYS[5], n = KEYS[6], l = KEYS[7] }
local max_queue_depth, actor, idem_ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
-- The jobs' own keys are made from the partition's prefixes (they share its
-- hash tag): records ARGV[4] .. id, idempotency ARGV[5] .. key, dependency
-- sets ARGV[6] .. id. ARGV[7] packs the jobs, eight fields each, every field
-- as its byte length (4 bytes, little-endian) and its bytes: job id, spec
-- JSON, max attempts, priority code, delay ms, idempotency key ("" for none),
-- dependency ids separated by spaces, and the task's reference: "" when the
-- JobDispatched event carries the spec whole, else "<start> <end> <sha256>":
-- the event carries the spec with its bytes start+1..end (the member
-- "task":<JSON>) replaced by "taskSha256":"<sha256>", and the spec's key
-- alone holds the task (the caller checked the span; Lua has no SHA-256).
-- A ninth field, "1" or "", says the job requires approval: it starts
-- pending_approval whatever its dependencies and delay (both recorded, and
-- honoured when it is approved: approve.lua).
-- One packed argument costs far less to send than ten per job, and
-- struct.unpack reads a job's fields in one call.
local job_prefix, idem_prefix, deps_prefix, packed = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
-- The spec goes in a key of its own (ARGV[8] .. id), so the record stays small.
local spec_prefix = ARGV[8]

local jobs = {}
local at = 1
local JOB = '<i4c0<i4c0<i4c0<i4c0<i4c0<i4c0<i4c0<i4c0<i4c0'
while at <= #packed do
  local id, spec, max_attempts, code, delay_ms, idem, deps, ref, approval
  id, spec, max_attempts, code, delay_ms, idem, deps, ref, approval, at =
    struct.unpack(JOB, packed, at)
  jobs[#jobs + 1] = {
    id = id, key = job_prefix .. id, spec = spec, max_attempts = max_attempts, code = code,
    delay_ms = tonumber(delay_ms), idem = idem, deps = deps, ref = ref,
    approval = approval == '1',
  }
end

local new_jobs, fresh = 0, 0
local batch_keys = {}  -- idempotency key -> the job of this batch that claims it
for _, job in ipairs(jobs) do
  if job.idem ~= '' then
    job.existing = redis.call('GET', idem_prefix .. job.idem) or batch_keys[job.idem]
    if not job.existing then batch_keys[job.idem] = job.id end
  end
  if not job.existing then
    if redis.call('EXISTS', job.key) == 1 then
      return { 'invalid_state', job.id }
    end
    new_jobs = new_jobs + 1
    -- Jobs that wait for dependencies or approval are not pending yet: the cap
    -- leaves them.
    if job.deps == '' and not job.approval then
      fresh = fresh + 1
    end
  end
end

if new_jobs > 0 and redis.call('EXISTS', meta) == 0 then
  return { 'unknown_agent' }
end

if max_queue_depth > 0 and fresh > 0 then
  local c = redis.call('HMGET', counts, 'queued', 'delayed', 'active')
  local pending = (tonumber(c[1]) or 0) + (tonumber(c[2]) or 0) + (tonumber(c[3]) or 0)
  if pending + fresh > max_queue_depth then
    return { 'queue_full', pending, max_queue_depth }
  end
end

local now = aq_now_us()
local now_text = aq_int(now)

-- Append the job's JobDispatched event; returns its id, the record's first.
-- Its `p` (the event before it: none) gives every event the same fields,
-- which the log stores once per block of entries.
local function dispatched(job, head)
  bell_log = log
  bell_loud = true
  local rest
  if job.ref == '' then
    rest = string.sub(job.spec, 2)
  else
    local s, e, sha = string.match(job.ref, '^(%d+) (%d+) (%x+)$')
    rest = string.sub(job.spec, 2, tonumber(s)) .. '"taskSha256":"' .. sha .. '"'
      .. string.sub(job.spec, tonumber(e) + 1)
  end
  return redis.call('XADD', log, '*', 'type', 'JobDispatched', 'jobId', job.id, 'v', '1',
    'at', now_text, 'actor', actor, 'data', head .. ',' .. rest, 'p', '', 'q', '')
end

-- The common case, ready at once: the record is written without building a table.
-- Returns the state and the JobDispatched event's id.
local function queue(job)
  redis.call('XADD', ready[job.code], '*', 'j', job.id)
  redis.call('SET', spec_prefix .. job.id, job.spec)
  local event_id = dispatched(job, '{"state":"queued"')
  redis.call('HSET', job.key, 'maxAttempts', job.max_attempts,
    'attempt', '0', 'budgetFrom', '0', 'prio', job.code, 'createdAt', now_text,
    'queuedAt', now_text, 'state', 'queued', 'events', event_id)
  return 'queued', event_id
end

-- Waiting for dependencies (with any delay honoured at release), or delayed.
local function hold(job)
  local state, head
  redis.call('SET', spec_prefix .. job.id, job.spec)
  local fields = { 'maxAttempts', job.max_attempts, 'attempt', '0',
    'budgetFrom', '0', 'prio', job.code, 'createdAt', now_text }
  local run_at = job.delay_ms > 0 and now + job.delay_ms * 1000
  if job.approval then
    state = 'pending_approval'
    head = '{"state":"pending_approval"'
    for dep in string.gmatch(job.deps, '%S+') do
      redis.call('SADD', deps_prefix .. job.id, dep)
    end
  elseif job.deps ~= '' then
    state = 'waiting_dependencies'
    head = '{"state":"waiting_dependencies"'
    for dep in string.gmatch(job.deps, '%S+') do
      redis.call('SADD', deps_prefix .. job.id, dep)
    end
  else
    state = 'delayed'
    head = '{"state":"delayed"'
    aq_delay(delayed, job.id, run_at)
  end
  if run_at then
    head = head .. ',"runAt":' .. aq_int(run_at)
    fields[#fields + 1] = 'runAt'
    fields[#fields + 1] = aq_int(run_at)
  end
  local event_id = dispatched(job, head)
  fields[#fields + 1] = 'state'
  fields[#fields + 1] = state
  fields[#fields + 1] = 'events'
  fields[#fields + 1] = event_id
  redis.call('HSET', job.key, unpack(fields))
  return state, event_id
end

-- Per job: its id, its state and its JobDispatched event's id; for an
-- idempotent repeat: the first job's id, 'existing' and ''.
local reply = { 'ok', now_text }
local added = {}  -- state -> jobs of this batch that start in it
for _, job in ipairs(jobs) do
  if job.existing then
    reply[#reply + 1] = job.existing
    reply[#reply + 1] = 'existing'
    reply[#reply + 1] = ''
  else
    local state, event_id
    if job.deps == '' and job.delay_ms == 0 and not job.approval then
      state, event_id = queue(job)
    else
      state, event_id = hold(job)
    end
    added[state] = (added[state] or 0) + 1
    if job.idem ~= '' then
      redis.call('SET', idem_prefix .. job.idem, job.id, 'EX', idem_ttl)
    end
    reply[#reply + 1] = job.id
    reply[#reply + 1] = state
    reply[#reply + 1] = event_id
  end
end
for state, n_added in pairs(added) do
  redis.call('HINCRBY', counts, state, n_added)
end
return reply
