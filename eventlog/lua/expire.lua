-- Remove from the partition the jobs that ended more than the retention ago
-- and whose every event is archived: their record, spec, dependency sets,
-- view entries and count. The candidates are the entries at the head of
-- `ended` ('<end ms> <job id>', in the order they were archived) that are due
-- by the server's clock; the first entry not due ends the look (entries come
-- in log order, but for one put back below: it delays those behind it by
-- no more than the archive lagged behind the log). Each candidate is checked
-- again here, since `ended` is only a hint written by the archiving pass: a
-- job retried since (no longer terminal) is dropped from `ended`, and one
-- whose last event is newer than the cutoff, or not archived yet, is put
-- back at the end, due at that event.
local counts, ended, expired, all = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local state_index = { completed = KEYS[5], failed = KEYS[6], cancelled = KEYS[7] }
local workers = KEYS[8]
-- ARGV[1] the retention (ms, > 0); ARGV[2] at most this many candidates;
-- ARGV[3] the last archived event id ('' when nothing is archived: nothing
-- is removed). The jobs' own keys share the partition's hash tag and are
-- made from its prefixes: records ARGV[4] .. id, specs ARGV[5] .. id,
-- dependency sets ARGV[6] .. id, dependents sets ARGV[7] .. id, and the
-- dispatcher indexes ARGV[8] .. dispatcher, long results ARGV[10] .. id.
-- ARGV[9]: heartbeats in `workers` this long past their deadline (ms) are
-- dropped too.
local jobs_ms, limit, archived = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local job_prefix, spec_prefix, deps_prefix = ARGV[4], ARGV[5], ARGV[6]
local dependents_prefix, by_prefix, forget_workers_ms = ARGV[7], ARGV[8], tonumber(ARGV[9])
local result_prefix = ARGV[10]

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
aq_ended_list(ended)
local candidates, looked, seen = {}, 0, {}
for _, entry in ipairs(redis.call('LRANGE', ended, 0, limit - 1)) do
  local end_ms, job_id = string.match(entry, '^(%d+) (%S+)$')
  if end_ms and tonumber(end_ms) >= cutoff_ms then break end
  looked = looked + 1
  -- An entry that is not '<ms> <id>', or a job's second entry, is dropped.
  if job_id and not seen[job_id] then
    seen[job_id] = true
    candidates[#candidates + 1] = job_id
  end
end
local remove, later = {}, {}
for _, job_id in ipairs(candidates) do
  local job_key = job_prefix .. job_id
  local cur = redis.call('HMGET', job_key, 'state', 'finishedAt', 'events')
  local state, finished, last = cur[1], tonumber(cur[2]), id_of(cur[3])
  -- A job gone already, or retried since (its next ending puts it back),
  -- just leaves `ended` with the entries looked at.
  if state and state_index[state] and finished and last then
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

-- Removed a batch at a time: one command per key, not one per job and key.
local reply, gone, of_state, of_by, left, counted = {}, {}, {}, {}, {}, {}
for _, job in ipairs(remove) do
  local job_id, job_key, state, by = job[1], job[2], job[3], job[4]
  for _, key in ipairs({ job_key, spec_prefix .. job_id, result_prefix .. job_id,
      deps_prefix .. job_id,
      dependents_prefix .. job_id, family_base .. 'children:' .. job_id,
      family_base .. 'cascaded:' .. job_id }) do
    gone[#gone + 1] = key
  end
  of_state[state] = of_state[state] or {}
  table.insert(of_state[state], job_id)
  if by ~= '' then
    of_by[by] = of_by[by] or {}
    table.insert(of_by[by], job_id)
  end
  counted[state] = (counted[state] or 0) + 1
  left[#left + 1] = job_id
  -- Left for the caller to take out of the global job indexes (another slot),
  -- listed in `expired` until then.
  reply[#reply + 1] = job_id
  reply[#reply + 1] = by
end
aq_chunked('DEL', nil, gone)
-- `all`: the index of every job a version before kept (Partition.index_all).
aq_chunked('ZREM', all, left)
-- The terminal states' and the dispatchers' indexes are paged (_lib.lua).
for state, ids in pairs(of_state) do
  aq_pages_rem(state_index[state], ids)
end
for by, ids in pairs(of_by) do
  aq_pages_rem(by_prefix .. by, ids)
end
for state, n in pairs(counted) do
  redis.call('HINCRBY', counts, state, -n)
end
if looked > 0 then
  redis.call('LTRIM', ended, looked, -1)
end
local again = {}
for _, job in ipairs(later) do
  again[#again + 1] = aq_int(job[2]) .. ' ' .. job[1]
end
aq_chunked('RPUSH', ended, again)
-- One field for the batch (its first job id): '<job id> <dispatcher>' lines.
local batch = ''
if #remove > 0 then
  local lines = {}
  for at = 1, #reply, 2 do
    lines[#lines + 1] = reply[at] .. ' ' .. reply[at + 1]
  end
  batch = remove[1][1]
  redis.call('HSET', expired, batch, table.concat(lines, '\n'))
end
redis.call('ZREMRANGEBYSCORE', workers, '-inf', '(' .. aq_int(now_ms - forget_workers_ms))
-- The removed jobs with their dispatchers (flat); whether a full batch of
-- candidates was read (look again) and how many of them left `ended` (when
-- none did, the rest wait for their last event to be archived); the
-- server's time (ms); the field of `expired` that lists the removed jobs
-- ('' when none was removed).
return { reply, looked >= limit and 1 or 0, looked - #later, aq_int(now_ms), batch }
