-- Take jobs out of the global job indexes (the global area's slot), the
-- counterpart of index.lua, with the same arguments: KEYS[1] the index of
-- every job, KEYS[1 + k] the index of a dispatcher, whose jobs' ids are
-- ARGV[k], separated by spaces. Returns how many left the index of every job.
local every = {}
for k = 1, #ARGV do
  local ids = {}
  for job_id in string.gmatch(ARGV[k], '%S+') do
    ids[#ids + 1] = job_id
    every[#every + 1] = job_id
  end
  aq_pages_rem(KEYS[1 + k], ids)
end
return aq_pages_rem(KEYS[1], every)
