-- waiting_dependencies | delayed | queued | active -> cancelled. Allowed for
-- the job's dispatcher, its target, or a system agent.
local counts, log, leases, active, delayed = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local job_key, deps, spec_key = KEYS[10], KEYS[11], KEYS[12]
local actor, job_id, target, is_system = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local notices = ARGV[5]  -- the partition's cancel-notice channel (optional)

local state = redis.call('HGET', job_key, 'state')
if not state then
  return { 'not_found' }
end
if is_system ~= '1' and actor ~= target
    and cjson.decode(aq_spec(spec_key, job_key))['dispatchedBy'] ~= actor then
  return { 'unauthorized' }
end
if state ~= 'waiting_dependencies' and state ~= 'delayed' and state ~= 'queued'
    and state ~= 'active' then
  return { 'invalid_state', state }
end

-- An active job's worker is told at once (it checks the attempt with a lease
-- renewal, which also runs every lease/3 in case the notice is lost).
-- Published before the first write: a refused PUBLISH leaves nothing half done.
if state == 'active' and notices then
  redis.call('PUBLISH', notices, job_id)
end

local now = aq_now_us()
if state == 'active' then
  aq_release(job_id, leases, active)
elseif state == 'delayed' then
  redis.call('ZREM', delayed, job_id)
elseif state == 'waiting_dependencies' then
  redis.call('DEL', deps)
end
-- A queued job's ready entry stays; the worker that reads it drops it.
redis.call('HSET', job_key, 'state', 'cancelled', 'finishedAt', aq_int(now))
redis.call('HDEL', job_key, 'runAt')
aq_append(log, job_key, job_id, 'JobCancelled', actor, now,
  '{"fromState":"' .. state .. '","reason":"cancel"}')
aq_count(counts, state, 'cancelled')
return { 'ok', state }
