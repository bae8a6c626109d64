-- Cancel a batch of the partition's queued and delayed jobs (the caller read
-- the candidates; each is checked again here). Waiting and active jobs stay.
local counts, log, delayed = KEYS[1], KEYS[2], KEYS[5]
local ready = { h = KEYS[6], n = KEYS[7], l = KEYS[8] }
local actor, n = ARGV[1], tonumber(ARGV[2])
-- Per job i: KEYS[9 + i] its record; ARGV[2 + 2i - 1] job id, ARGV[2 + 2i]
-- its ready entry as '<priority code> <entry id>' or '' for a delayed job.
-- What the caller read may be stale: a delayed job may have been queued since
-- (its entry unknown here), or the same job may come twice.

-- Every read and check first (Redis does not roll a script back): which jobs
-- are drained, from which state.
local chosen = {}
local seen = {}  -- job id -> its place in chosen
for i = 1, n do
  local job_key, job_id, entry = KEYS[9 + i], ARGV[1 + 2 * i], ARGV[2 + 2 * i]
  local code, entry_id = string.match(entry, '^(%a) (%S+)$')
  local job = seen[job_id] and chosen[seen[job_id]]
  if job then
    if not job.stream then job.stream, job.entry = ready[code or ''], entry_id end
  else
    local state = redis.call('HGET', job_key, 'state')
    if state == 'queued' or state == 'delayed' then
      chosen[#chosen + 1] = { key = job_key, id = job_id, state = state,
        stream = ready[code or ''], entry = entry_id }
      seen[job_id] = #chosen
    end
  end
end

local now = aq_now_us()
local drained = {}
for _, job in ipairs(chosen) do
  if job.state == 'delayed' then
    redis.call('ZREM', delayed, job.id)
  end
  if job.stream then
    -- A worker that already read this entry drops it when start finds the
    -- job cancelled; deleting it spares the others the read. A job queued
    -- after the caller read the streams keeps its entry, dropped the same way.
    redis.call('XDEL', job.stream, job.entry)
  end
  redis.call('HSET', job.key, 'state', 'cancelled', 'finishedAt', aq_int(now))
  redis.call('HDEL', job.key, 'runAt')
  aq_append(log, job.key, job.id, 'JobCancelled', actor, now,
    '{"fromState":"' .. job.state .. '","reason":"drain"}')
  aq_count(counts, job.state, 'cancelled')
  drained[#drained + 1] = job.id
end
return drained
