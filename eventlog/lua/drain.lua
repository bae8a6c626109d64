-- Cancel a batch of the partition's queued and delayed jobs (the caller read
-- the candidates; each is checked again here). Waiting and active jobs stay.
local counts, log, delayed = KEYS[1], KEYS[2], KEYS[5]
local ready = { h = KEYS[6], n = KEYS[7], l = KEYS[8] }
local actor, n = ARGV[1], tonumber(ARGV[2])
-- Per job i: KEYS[9 + i] its record; ARGV[2 + 2i - 1] job id, ARGV[2 + 2i]
-- its ready entry as '<priority code> <entry id>' or '' for a delayed job.

local now = aq_now_us()
local drained = {}
for i = 1, n do
  local job_key, job_id, entry = KEYS[9 + i], ARGV[1 + 2 * i], ARGV[2 + 2 * i]
  local state = redis.call('HGET', job_key, 'state')
  if state == 'queued' or state == 'delayed' then
    if state == 'delayed' then
      redis.call('ZREM', delayed, job_id)
    else
      -- A worker that already read this entry drops it when start finds the
      -- job cancelled; deleting it spares the others the read.
      local code, id = string.match(entry, '^(%a) (%S+)$')
      redis.call('XDEL', ready[code], id)
    end
    redis.call('HSET', job_key, 'state', 'cancelled', 'finishedAt', aq_int(now))
    redis.call('HDEL', job_key, 'runAt')
    aq_append(log, job_key, job_id, 'JobCancelled', actor, now,
      '{"fromState":"' .. state .. '","reason":"drain"}')
    aq_count(counts, state, 'cancelled')
    drained[#drained + 1] = job_id
  end
end
return drained
