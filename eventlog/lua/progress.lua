-- Record an active attempt's progress. Fenced by the attempt number.
local log, job_key = KEYS[2], KEYS[10]
local actor, job_id, attempt, progress = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local cur = redis.call('HMGET', job_key, 'state', 'attempt')
if cur[1] ~= 'active' or cur[2] ~= attempt then
  return { 'invalid_state', cur[1] or 'missing', cur[2] or '0' }
end
redis.call('HSET', job_key, 'progress', progress)
aq_append(log, job_key, job_id, 'JobProgress', actor, aq_now_us(),
  '{"attempt":' .. attempt .. ',' .. string.sub(progress, 2))
return { 'ok' }
