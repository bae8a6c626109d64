-- For a batch of jobs of one partition that just ended, which ones matter to
-- the gates: those with registered dependents or that asked to announce.
-- Returns, for those only: job id, result, error, spec, dependents...
-- The ids come from the events, so the keys are made from the partition's
-- prefixes (ARGV[1], ARGV[2]); KEYS[1] pins the partition's slot. Reads only.
local job_prefix, dependents_prefix = ARGV[1], ARGV[2]

local out = {}
for job_id in string.gmatch(ARGV[3], '%S+') do
  local dependents = redis.call('SMEMBERS', dependents_prefix .. job_id)
  local cur = redis.call('HMGET', job_prefix .. job_id, 'spec', 'result', 'error')
  local announce = cur[1] and string.find(cur[1], '"announce":true', 1, true)
  if #dependents > 0 or announce then
    out[#out + 1] = { job_id, cur[2] or '', cur[3] or '', cur[1] or '', dependents }
  end
end
return out
