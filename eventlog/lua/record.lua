-- Record what an archiving pass just made durable: KEYS[1] `ended`, KEYS[2]
-- the partition's `archive` hash. ARGV[1]: the jobs that ended in what was
-- archived, '<end ms> <job id>' pairs separated by spaces, in log order, pushed
-- onto `ended` (a job retried and ended again is there twice: expire.lua judges
-- each entry by the job's record). ARGV[2], ARGV[3], ARGV[4], when given: the
-- archive's end (its last event id, '' for none: the hash goes), the head of
-- its chain and its seq. One step, so that a crash leaves both or neither.
local ended, archive = KEYS[1], KEYS[2]
aq_ended_list(ended)
local entries = {}
for ms, job_id in string.gmatch(ARGV[1], '(%d+) (%S+)') do
  entries[#entries + 1] = ms .. ' ' .. job_id
end
aq_chunked('RPUSH', ended, entries)
if #ARGV >= 4 then
  if ARGV[2] == '' then
    redis.call('DEL', archive)
  else
    redis.call('HSET', archive, 'last', ARGV[2], 'head', ARGV[3], 'seq', ARGV[4])
  end
end
return 1
