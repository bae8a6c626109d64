-- pending_approval -> queued | delayed | waiting_dependencies: an approver let
-- the job go on to where its dependencies and delay put it, as a dispatch
-- without approval would have: dependencies still open -> waiting for them;
-- a run time still ahead -> delayed; else queued. A dependency that failed (or
-- was cancelled) while the job waited failed it then (resolve.lua wrote
-- `failedBy`): approved, it fails at once with reason dependency_failed, as a
-- waiting job would have (JobApproved to waiting_dependencies, then JobFailed).
-- Allowed to approvers only (ARGV[3], the caller's judgment of auth.approvers).
local counts, log, delayed = KEYS[1], KEYS[2], KEYS[5]
local ready = { h = KEYS[6], n = KEYS[7], l = KEYS[8] }
local job_key, deps = KEYS[10], KEYS[11]
local actor, job_id, allowed, note = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local cur = redis.call('HMGET', job_key, 'state', 'runAt', 'prio', 'failedBy', 'attempt',
  'error')
local state = cur[1]
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
local extra = ''
if note ~= '' then extra = ',"note":' .. aq_jstr(note) end
local run_at = tonumber(cur[2])

if cur[4] then
  local failed_by = cur[4]
  redis.call('HSET', job_key, 'state', 'waiting_dependencies')
  aq_append(log, job_key, job_id, 'JobApproved', actor, now,
    '{"state":"waiting_dependencies"' .. extra .. '}')
  redis.call('DEL', deps)
  redis.call('HSET', job_key, 'state', 'failed', 'finishedAt', aq_int(now))
  aq_append(log, job_key, job_id, 'JobFailed', 'system', now,
    '{"attempt":' .. cur[5] .. ',"error":' .. aq_jstr(cur[6] or '')
    .. ',"reason":"dependency_failed","dependencyId":' .. aq_jstr(failed_by) .. '}')
  aq_count(counts, 'pending_approval', 'failed')
  return { 'ok', 'failed' }
end

local to
if redis.call('SCARD', deps) > 0 then
  to = 'waiting_dependencies'
  redis.call('HSET', job_key, 'state', to)
  aq_append(log, job_key, job_id, 'JobApproved', actor, now, '{"state":"' .. to .. '"' .. extra .. '}')
elseif run_at and run_at > now then
  to = 'delayed'
  aq_delay(delayed, job_id, run_at)
  redis.call('HSET', job_key, 'state', to)
  aq_append(log, job_key, job_id, 'JobApproved', actor, now,
    '{"state":"delayed","runAt":' .. aq_int(run_at) .. extra .. '}')
else
  to = 'queued'
  redis.call('XADD', ready[cur[3]], '*', 'j', job_id)
  redis.call('HSET', job_key, 'state', to, 'queuedAt', aq_int(now))
  redis.call('HDEL', job_key, 'runAt')
  aq_append(log, job_key, job_id, 'JobApproved', actor, now, '{"state":"queued"' .. extra .. '}')
end
aq_count(counts, 'pending_approval', to)
return { 'ok', to }
