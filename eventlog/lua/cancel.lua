-- pending_approval | waiting_dependencies | delayed | queued | active ->
-- cancelled. Allowed for the job's dispatcher, its target, or a system agent.
-- With cascade (ARGV[6] "1") the job's mark (KEYS[13]) is set in the same
-- step: the gates then cancel its children, the ones they know and any whose
-- dispatch they see later (adopt.lua). With a parent (ARGV[7]) the gates cancel
-- a child because that parent was so cancelled: reason parent_cancelled, and
-- the child cascades too; a child that has already ended is only marked (its
-- own children are still cancelled), and the refusal names its state.
local counts, log, leases, active, delayed = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local job_key, deps, spec_key, cascaded = KEYS[10], KEYS[11], KEYS[12], KEYS[13]
local actor, job_id, target, is_system = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local notices = ARGV[5]  -- the partition's cancel-notice channel (optional)
local cascade, parent = ARGV[6] == '1', ARGV[7] or ''

local state = redis.call('HGET', job_key, 'state')
if not state then
  return { 'not_found' }
end
if is_system ~= '1' and actor ~= target
    and cjson.decode(aq_spec(spec_key, job_key))['dispatchedBy'] ~= actor then
  return { 'unauthorized' }
end
if state ~= 'waiting_dependencies' and state ~= 'delayed' and state ~= 'queued'
    and state ~= 'active' and state ~= 'pending_approval' then
  if parent ~= '' and cascaded then
    redis.call('SET', cascaded, '1')
  end
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
elseif state == 'waiting_dependencies' or state == 'pending_approval' then
  redis.call('DEL', deps)
end
if cascade and cascaded then
  redis.call('SET', cascaded, '1')
end
-- A queued job's ready entry stays; the worker that reads it drops it.
redis.call('HSET', job_key, 'state', 'cancelled', 'finishedAt', aq_int(now))
redis.call('HDEL', job_key, 'runAt')
local data = '{"fromState":"' .. state .. '"'
if parent ~= '' then
  data = data .. ',"reason":"parent_cancelled","cascade":true,"parentJobId":' .. aq_jstr(parent)
elseif cascade then
  data = data .. ',"reason":"cancel","cascade":true'
else
  data = data .. ',"reason":"cancel"'
end
aq_append(log, job_key, job_id, 'JobCancelled', actor, now, data .. '}')
aq_count(counts, state, 'cancelled')
return { 'ok', state }
