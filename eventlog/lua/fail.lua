-- An attempt failed: active -> delayed/queued with attempts left (backoff),
-- else active -> failed. Fenced by the attempt number like complete.
local counts, log, leases, active, delayed = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local ready = { h = KEYS[6], n = KEYS[7], l = KEYS[8] }
local job_key = KEYS[10]
local actor, job_id, attempt, err = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local base_ms, max_ms, spread = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])

local cur = redis.call('HMGET', job_key, 'state', 'attempt', 'budgetFrom')
if cur[1] ~= 'active' or cur[2] ~= attempt then
  return { 'invalid_state', cur[1] or 'missing', cur[2] or '0' }
end

local now = aq_now_us()
local left = aq_attempts_left(job_key)
aq_release(job_id, leases, active)
redis.call('HSET', job_key, 'error', err)
if left > 0 then
  local used = tonumber(attempt) - tonumber(cur[3])
  local state, run_at = aq_requeue(job_key, job_id, aq_backoff_ms(used, base_ms, max_ms, spread),
    now, delayed, ready)
  local data = '{"attempt":' .. attempt .. ',"error":' .. aq_jstr(err) .. ',"state":"' .. state .. '"'
  if run_at then data = data .. ',"runAt":' .. aq_int(run_at) end
  aq_append(log, job_key, job_id, 'JobAttemptFailed', actor, now, data .. '}')
  aq_count(counts, 'active', state)
  return { 'ok', state }
end
redis.call('HSET', job_key, 'state', 'failed', 'finishedAt', aq_int(now))
aq_append(log, job_key, job_id, 'JobFailed', actor, now,
  '{"attempt":' .. attempt .. ',"error":' .. aq_jstr(err) .. ',"reason":"attempts_exhausted"}')
aq_count(counts, 'active', 'failed')
return { 'ok', 'failed' }
