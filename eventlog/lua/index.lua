-- Add jobs to the global job indexes (the global area's slot): KEYS[1] the
-- index of every job, KEYS[1 + k] the index of a dispatcher, whose jobs'
-- ids are ARGV[k], separated by spaces (one argument per dispatcher, not
-- two per job: the client encodes one string for a batch). Sent before the
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

for k = 1, #ARGV do
  local by = KEYS[1 + k]
  for job_id in string.gmatch(ARGV[k], '%S+') do
    put(all, job_id)
    put(by, job_id)
  end
end
for key in pairs(pending) do flush(key) end
return added
