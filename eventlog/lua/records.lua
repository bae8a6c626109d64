-- Read jobs' state records with their specs and long results, in one call
-- (reads only). KEYS[1] the partition's log (it names the slot); the jobs' keys
-- share its hash tag and are made from the partition's prefixes: records
-- ARGV[1] .. id, specs ARGV[2] .. id, results ARGV[4] .. id, for the ids of
-- ARGV[3] (separated by spaces). The reply holds, per job, the record's names
-- and values (flat; empty when the job does not exist), the spec and the
-- result (each nil when it has no key of its own: a result only when the
-- record's `longResult` says so). One call and
-- one argument for a batch of jobs, not two pipelined commands per job: a
-- whole partition (audit verify) costs the client replies to parse, not
-- thousands of commands to encode.
local job_prefix, spec_prefix, result_prefix = ARGV[1], ARGV[2], ARGV[4]
local reply = {}
for job_id in string.gmatch(ARGV[3], '%S+') do
  reply[#reply + 1] = redis.call('HGETALL', job_prefix .. job_id)
  reply[#reply + 1] = redis.call('GET', spec_prefix .. job_id)
  reply[#reply + 1] = redis.call('HEXISTS', job_prefix .. job_id, 'longResult') == 1
    and redis.call('GET', result_prefix .. job_id)
end
return reply
