-- In a dependent's partition: its dependency was retried. A job that failed
-- only because of that dependency waits for it again: failed ->
-- waiting_dependencies, with that dependency and every other one that has not
-- completed (ARGV[4..], as the caller read them) back in its set. The caller
-- then registers with each of those again, so one that ended meanwhile is
-- resolved at once.
local counts, log = KEYS[1], KEYS[2]
local job_key, deps = KEYS[10], KEYS[11]
local actor, job_id, dep_id = ARGV[1], ARGV[2], ARGV[3]

local cur = redis.call('HMGET', job_key, 'state', 'failedBy', 'attempt')
if cur[1] ~= 'failed' or cur[2] ~= dep_id then
  return { 'skipped' }
end
local now = aq_now_us()
redis.call('SADD', deps, dep_id)
for i = 4, #ARGV do
  redis.call('SADD', deps, ARGV[i])
end
redis.call('HSET', job_key, 'state', 'waiting_dependencies')
redis.call('HDEL', job_key, 'finishedAt', 'failedBy')
aq_append(log, job_key, job_id, 'JobRetried', actor, now,
  '{"attempt":' .. cur[3] .. ',"state":"waiting_dependencies","dependencyId":'
  .. aq_jstr(dep_id) .. '}')
aq_count(counts, 'failed', 'waiting_dependencies')
return { 'rearmed' }
