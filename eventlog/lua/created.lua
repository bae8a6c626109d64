-- Which of a batch of jobs were dispatched no later than a millisecond, by the
-- server's clock: their record's `createdAt` (µs), which a job id's time (the
-- dispatching host's clock) may not match. KEYS[1] the partition's log (it
-- names the slot); the records are ARGV[1] .. id for the ids of ARGV[3]
-- (separated by spaces); ARGV[2] the millisecond. Returns those ids, in order:
-- a job with no record is left out, one whose `createdAt` is no number kept.
-- Reads only. One call and one argument for a batch: `projections rebuild`
-- asks this of every record of a trimmed partition dated after its log's start.
local job_prefix, bound_ms = ARGV[1], tonumber(ARGV[2])
local out = {}
for job_id in string.gmatch(ARGV[3], '%S+') do
  local at = redis.call('HGET', job_prefix .. job_id, 'createdAt')
  if at then
    local us = tonumber(at)
    if not us or math.floor(us / 1000) <= bound_ms then
      out[#out + 1] = job_id
    end
  end
end
return out
