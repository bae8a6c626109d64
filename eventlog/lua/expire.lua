-- Remove from the partition the jobs that ended more than the retention ago
-- and whose every event is archived: their record, spec, dependency sets,
-- view entries and count. The candidates are the members of `ended` (job id
-- -> end time, ms) due by the server's clock; each is checked again here,
-- since `ended` is only a hint written by the archiving pass: a job retried
-- since (no longer terminal) leaves `ended`, and one whose last event is
-- newer than the cutoff, or not archived yet, stays for later.
local counts, ended, expired, all = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local state_index = { completed = KEYS[5], failed = KEYS[6], cancelled = KEYS[7] }
local workers = KEYS[8]
-- ARGV[1] the retention (ms, > 0); ARGV[2] at most this many candidates;
-- ARGV[3] the last archived event id ('' when nothing is archived: nothing
-- is removed). The jobs' own keys share the partition's hash tag and are
-- made from its prefixes: records ARGV[4] .. id, specs ARGV[5] .. id,
-- dependency sets ARGV[6] .. id, dependents sets ARGV[7] .. id, and the
-- dispatcher indexes ARGV[8] .. dispatcher. ARGV[9]: heartbeats in `workers`
-- this long past their deadline (ms) are dropped too.
local jobs_ms, limit, archived = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local job_prefix, spec_prefix, deps_prefix = ARGV[4], ARGV[5], ARGV[6]
local dependents_prefix, by_prefix, forget_workers_ms = ARGV[7], ARGV[8], tonumber(ARGV[9])

-- A stream id as two numbers (ms, seq); ms fits a double exactly.
local function id_of(text)
  local ms, seq = string.match(text or '', '(%d+)%-(%d+)%s*$')
  if not ms then return nil end
  return { tonumber(ms), tonumber(seq) }
end

local function not_after(a, b)
  return a[1] < b[1] or (a[1] == b[1] and a[2] <= b[2])
end

-- A job's children index and cascade mark (keys.py: children, cascaded) sit
-- beside its dependency set, under the same partition base.
local family_base = string.match(deps_prefix, '^(.*:)deps:$') or deps_prefix

local now_ms = math.floor(aq_now_us() / 1000)
local cutoff_ms = now_ms - jobs_ms
local last_archived = id_of(archived)

-- Every read and check first (Redis does not roll a script back).
local candidates = redis.call('ZRANGEBYSCORE', ended, '-inf', '(' .. aq_int(cutoff_ms),
  'LIMIT', 0, limit)
local remove, forget, later = {}, {}, {}
for _, job_id in ipairs(candidates) do
  local job_key = job_prefix .. job_id
  local cur = redis.call('HMGET', job_key, 'state', 'finishedAt', 'events')
  local state, finished, last = cur[1], tonumber(cur[2]), id_of(cur[3])
  if not state or not state_index[state] or not finished or not last then
    -- Gone already, or retried since (its next ending puts it back).
    forget[#forget + 1] = job_id
  else
    -- Due when both its end and its last event (a DependencyResolved may come
    -- after a cancel) are older than the cutoff.
    local due_ms = math.max(math.floor(finished / 1000), last[1])
    if due_ms >= cutoff_ms or not last_archived or not not_after(last, last_archived) then
      later[#later + 1] = { job_id, math.max(due_ms, cutoff_ms) }
    else
      local spec = aq_spec(spec_prefix .. job_id, job_key)
      local ok, decoded = pcall(cjson.decode, spec or '')
      local by = ok and type(decoded) == 'table' and decoded['dispatchedBy']
      remove[#remove + 1] = { job_id, job_key, state, type(by) == 'string' and by or '' }
    end
  end
end

local reply = {}
for _, job in ipairs(remove) do
  local job_id, job_key, state, by = job[1], job[2], job[3], job[4]
  redis.call('DEL', job_key, spec_prefix .. job_id, deps_prefix .. job_id,
    dependents_prefix .. job_id, family_base .. 'children:' .. job_id,
    family_base .. 'cascaded:' .. job_id)
  redis.call('ZREM', all, job_id)
  redis.call('ZREM', state_index[state], job_id)
  if by ~= '' then
    redis.call('ZREM', by_prefix .. by, job_id)
  end
  redis.call('HINCRBY', counts, state, -1)
  redis.call('ZREM', ended, job_id)
  -- Left for the caller to take out of the global job indexes (another slot).
  redis.call('HSET', expired, job_id, by)
  reply[#reply + 1] = job_id
  reply[#reply + 1] = by
end
for _, job_id in ipairs(forget) do
  redis.call('ZREM', ended, job_id)
end
for _, job in ipairs(later) do
  redis.call('ZADD', ended, job[2], job[1])
end
redis.call('ZREMRANGEBYSCORE', workers, '-inf', '(' .. aq_int(now_ms - forget_workers_ms))
-- The removed jobs with their dispatchers (flat); whether a full batch of
-- candidates was read (look again) and how many of them left `ended` (when
-- none did, the rest wait for their last event to be archived); the
-- server's time (ms).
return { reply, #candidates >= limit and 1 or 0, #remove + #forget, aq_int(now_ms) }
