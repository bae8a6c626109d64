-- Add jobs to the global job indexes (the global area's slot): KEYS[1] the
-- index of every job, KEYS[2..] one index per dispatcher. ARGV: per job its id
-- and the number of its dispatcher's index (1 for KEYS[2]). Sent in the same
-- round trip as the dispatch scripts that make the jobs, so that a dispatch
-- acknowledged is listed; adding twice changes nothing. Returns how many were new.
local all = KEYS[1]
local added = 0
for i = 1, #ARGV, 2 do
  local job_id, by = ARGV[i], tonumber(ARGV[i + 1])
  added = added + redis.call('ZADD', all, 0, job_id)
  redis.call('ZADD', KEYS[1 + by], 0, job_id)
end
return added
