-- Add jobs to the global job indexes (the global area's slot): KEYS[1] the
-- index of every job, KEYS[1 + k] the index of a dispatcher, whose jobs'
-- ids are ARGV[k], separated by spaces (one argument per dispatcher, not
-- two per job: the client encodes one string for a batch). Sent before the
-- dispatch scripts that make the jobs, on the same connection (on a cluster,
-- acknowledged before they are sent), so that a job that exists is listed;
-- adding twice changes nothing. Returns how many were new.
local all = KEYS[1]
-- ZADD takes many members at once: one call per key and chunk, not per job;
-- a dispatcher's chunk goes into both its index and the index of every job.
local CHUNK = 500
local added = 0

local function add(members)
  redis.call('ZADD', KEYS[members.by], unpack(members))
  added = added + redis.call('ZADD', all, unpack(members))
end

for k = 1, #ARGV do
  local members = { by = 1 + k }
  for job_id in string.gmatch(ARGV[k], '%S+') do
    members[#members + 1] = 0
    members[#members + 1] = job_id
    if #members >= 2 * CHUNK then
      add(members)
      members = { by = 1 + k }
    end
  end
  if #members > 0 then add(members) end
end
return added
