-- pending_approval -> cancelled: an approver rejected the job (JobRejected,
-- which ends it as a cancel does: its dependents fail or run as they said,
-- an announce is sent). Allowed to approvers only (ARGV[3]).
local counts, log = KEYS[1], KEYS[2]
local job_key, deps = KEYS[10], KEYS[11]
local actor, job_id, allowed, reason = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local state = redis.call('HGET', job_key, 'state')
if not state then
  return { 'not_found' }
end
if allowed ~= '1' then
  return { 'unauthorized' }
end
if state ~= 'pending_approval' then
  return { 'invalid_state', state }
end

local now = aq_now_us()
redis.call('DEL', deps)
redis.call('HSET', job_key, 'state', 'cancelled', 'finishedAt', aq_int(now))
redis.call('HDEL', job_key, 'runAt')
local data = '{}'
if reason ~= '' then data = '{"reason":' .. aq_jstr(reason) .. '}' end
aq_append(log, job_key, job_id, 'JobRejected', actor, now, data)
aq_count(counts, 'pending_approval', 'cancelled')
return { 'ok' }
