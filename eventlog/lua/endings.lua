-- For a batch of jobs of one partition that just ended, which ones matter to
-- the gates: those with registered dependents or that asked to announce.
-- Returns, for those only: job id, result, error, spec, dependents...
-- The ids come from the events, so the keys are made from the partition's
-- prefixes (ARGV[1], ARGV[2], specs ARGV[4], results ARGV[5]); KEYS[1] pins
-- the partition's slot. Reads only.
local job_prefix, dependents_prefix, spec_prefix = ARGV[1], ARGV[2], ARGV[4]
local result_prefix = ARGV[5]

local out = {}
for job_id in string.gmatch(ARGV[3], '%S+') do
  local dependents = redis.call('SMEMBERS', dependents_prefix .. job_id)
  local spec = aq_spec(spec_prefix .. job_id, job_prefix .. job_id)
  local announce = spec and string.find(spec, '"announce":true', 1, true)
  if #dependents > 0 or announce then
    local result = aq_result(job_prefix .. job_id, result_prefix .. job_id)
    local err = redis.call('HGET', job_prefix .. job_id, 'error')
    out[#out + 1] = { job_id, result or '', err or '', spec or '', dependents }
  end
end
return out
