-- Add jobs to the global job indexes (the global area's slot): KEYS[1] the
-- index of every job, KEYS[2..] one index per dispatcher. ARGV: per job its id
-- and the number of its dispatcher's index (1 for KEYS[2]). Sent before the
-- dispatch scripts that make the jobs, on the same connection (on a cluster,
-- acknowledged before they are sent), so that a job that exists is listed;
-- adding twice changes nothing. Returns how many were new.
local all = KEYS[1]
-- ZADD takes many members at once: one call per key and chunk, not per job.
local CHUNK = 500
local added = 0
local pending = { [all] = {} }

local function flush(key)
  local members = pending[key]
  if #members > 0 then
    local n = redis.call('ZADD', key, unpack(members))
    if key == all then added = added + n end
    pending[key] = {}
  end
end

local function put(key, job_id)
  local members = pending[key]
  if not members then
    members = {}
    pending[key] = members
  end
  members[#members + 1] = 0
  members[#members + 1] = job_id
  if #members >= 2 * CHUNK then flush(key) end
end

for i = 1, #ARGV, 2 do
  local job_id = ARGV[i]
  put(all, job_id)
  put(KEYS[1 + tonumber(ARGV[i + 1])], job_id)
end
for key in pairs(pending) do flush(key) end
return added
