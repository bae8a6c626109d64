-- Add jobs to the global job indexes (the global area's slot): KEYS[1] the
-- index of every job, KEYS[1 + k] the index of a dispatcher, whose jobs'
-- ids are ARGV[k], separated by spaces (one argument per dispatcher, not
-- two per job: the client encodes one string for a batch). Sent before the
-- dispatch scripts that make the jobs, on the same connection (on a cluster,
-- acknowledged before they are sent), so that a job that exists is listed;
-- adding twice changes nothing. The indexes are paged (_lib.lua); each call
-- also moves a few ids of an index kept whole by a version before into its
-- pages. Returns how many were new.
local all = KEYS[1]
local added = 0
aq_pages_migrate(all, 200)
for k = 1, #ARGV do
  local ids = {}
  for job_id in string.gmatch(ARGV[k], '%S+') do
    ids[#ids + 1] = job_id
  end
  aq_pages_migrate(KEYS[1 + k], 200)
  aq_pages_add(KEYS[1 + k], ids)
  added = added + aq_pages_add(all, ids)
end
return added
