-- Which of the given jobs each index lists (reads only): KEYS[i] an index and
-- ARGV[i] job ids separated by spaces. The reply holds, per index, one
-- character per job, in order: '1' listed, '0' not. One argument per index,
-- not one per job, and a short reply: audit verify asks this of every job.
local reply = {}
for i, key in ipairs(KEYS) do
  local marks = {}
  for job_id in string.gmatch(ARGV[i], '%S+') do
    marks[#marks + 1] = redis.call('ZSCORE', key, job_id) and '1' or '0'
  end
  reply[i] = table.concat(marks)
end
return reply
