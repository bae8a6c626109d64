-- failed -> queued with a fresh budget of maxAttempts attempts.
local counts, log = KEYS[1], KEYS[2]
local ready = { h = KEYS[6], n = KEYS[7], l = KEYS[8] }
local job_key = KEYS[10]
local actor, job_id = ARGV[1], ARGV[2]

local cur = redis.call('HMGET', job_key, 'state', 'attempt', 'prio')
if not cur[1] then
  return { 'not_found' }
end
if cur[1] ~= 'failed' then
  return { 'invalid_state', cur[1] }
end

local now = aq_now_us()
redis.call('HSET', job_key, 'state', 'queued', 'budgetFrom', cur[2], 'queuedAt', aq_int(now))
redis.call('HDEL', job_key, 'finishedAt', 'failedBy')
redis.call('XADD', ready[cur[3]], '*', 'j', job_id)
aq_append(log, job_key, job_id, 'JobRetried', actor, now,
  '{"attempt":' .. cur[2] .. ',"state":"queued"}')
aq_count(counts, 'failed', 'queued')
return { 'ok' }
