-- Take jobs out of the global job indexes (the global area's slot), the
-- counterpart of index.lua, with the same arguments: KEYS[1] the index of
-- every job, KEYS[1 + k] the index of a dispatcher, whose jobs' ids are
-- ARGV[k], separated by spaces. Returns how many left the index of every job.
local all = KEYS[1]
local CHUNK = 500
local removed = 0

local function take_out(key, ids)
  for at = 1, #ids, CHUNK do
    local n = redis.call('ZREM', key, unpack(ids, at, math.min(at + CHUNK - 1, #ids)))
    if key == all then removed = removed + n end
  end
end

local every = {}
for k = 1, #ARGV do
  local ids = {}
  for job_id in string.gmatch(ARGV[k], '%S+') do
    ids[#ids + 1] = job_id
    every[#every + 1] = job_id
  end
  take_out(KEYS[1 + k], ids)
end
take_out(all, every)
return removed
