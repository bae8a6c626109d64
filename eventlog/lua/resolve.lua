-- In a waiting job's partition: one of its dependencies ended. Records
-- DependencyResolved (once: a dependency no longer in the set was already
-- resolved, and then nothing happens). The resolution that leaves the set
-- empty releases the job to queued (or delayed, when its run time is still
-- ahead). A failed or cancelled dependency fails the job at once, unless the
-- job said onDependencyFailure "ignore".
local counts, log, delayed = KEYS[1], KEYS[2], KEYS[5]
local ready = { h = KEYS[6], n = KEYS[7], l = KEYS[8] }
local job_key, deps = KEYS[10], KEYS[11]
local actor, job_id, dep_id, dep_state = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local dep_result, dep_error, ignore_failure = ARGV[5], ARGV[6], ARGV[7]

if redis.call('SISMEMBER', deps, dep_id) == 0 then
  return { 'seen' }
end
local state = redis.call('HGET', job_key, 'state')

local now = aq_now_us()
redis.call('SREM', deps, dep_id)
local data = '{"dependencyId":' .. aq_jstr(dep_id) .. ',"state":"' .. dep_state .. '"'
if dep_result ~= '' then data = data .. ',"result":' .. dep_result end
if dep_error ~= '' then data = data .. ',"error":' .. aq_jstr(dep_error) end
aq_append(log, job_key, job_id, 'DependencyResolved', actor, now, data .. '}')
if state == 'pending_approval' and dep_state ~= 'completed' and ignore_failure ~= '1'
    and redis.call('HEXISTS', job_key, 'failedBy') == 0 then
  -- Awaiting approval, it cannot fail yet: the first failure is kept, and
  -- fails the job when it is approved (approve.lua).
  redis.call('HSET', job_key, 'failedBy', dep_id, 'error', 'dependency ' .. dep_id .. ' '
    .. dep_state)
  return { 'resolved' }
end
if state ~= 'waiting_dependencies' then
  return { 'resolved' }
end

if dep_state ~= 'completed' and ignore_failure ~= '1' then
  local err = 'dependency ' .. dep_id .. ' ' .. dep_state
  local attempt = redis.call('HGET', job_key, 'attempt')
  redis.call('HSET', job_key, 'state', 'failed', 'error', err, 'finishedAt', aq_int(now),
    'failedBy', dep_id)
  aq_append(log, job_key, job_id, 'JobFailed', actor, now,
    '{"attempt":' .. attempt .. ',"error":' .. aq_jstr(err)
    .. ',"reason":"dependency_failed","dependencyId":' .. aq_jstr(dep_id) .. '}')
  aq_count(counts, 'waiting_dependencies', 'failed')
  return { 'failed' }
end

if redis.call('SCARD', deps) > 0 then
  return { 'resolved' }
end
local cur = redis.call('HMGET', job_key, 'runAt', 'prio')
local run_at = tonumber(cur[1])
if run_at and run_at > now then
  aq_delay(delayed, job_id, run_at)
  redis.call('HSET', job_key, 'state', 'delayed')
  aq_append(log, job_key, job_id, 'JobDelayed', actor, now,
    '{"runAt":' .. aq_int(run_at) .. ',"reason":"released"}')
  aq_count(counts, 'waiting_dependencies', 'delayed')
  return { 'delayed' }
end
redis.call('XADD', ready[cur[2]], '*', 'j', job_id)
redis.call('HSET', job_key, 'state', 'queued', 'queuedAt', aq_int(now))
redis.call('HDEL', job_key, 'runAt')
aq_append(log, job_key, job_id, 'JobQueued', actor, now, '{"reason":"released"}')
aq_count(counts, 'waiting_dependencies', 'queued')
return { 'queued' }
