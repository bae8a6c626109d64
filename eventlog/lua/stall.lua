-- Reclaim active jobs whose lease has expired (by the server's clock). The
-- attempt is used up: the job goes back to run again, or fails when none are left.
local counts, log, leases, active, delayed = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local ready = { h = KEYS[6], n = KEYS[7], l = KEYS[8] }
local timers = KEYS[9]
local actor, base_ms, max_ms, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
-- Per job i: KEYS[9 + i] its record; ARGV[4 + 2i - 1] job id, ARGV[4 + 2i] jitter spread.

local now = aq_now_us()
local reclaimed = {}
for i = 1, n do
  local job_key, job_id, spread = KEYS[9 + i], ARGV[3 + 2 * i], tonumber(ARGV[4 + 2 * i])
  local deadline = tonumber(redis.call('ZSCORE', leases, job_id))
  local cur = redis.call('HMGET', job_key, 'state', 'attempt', 'budgetFrom')
  if deadline and deadline <= now / 1000 and cur[1] == 'active' then
    local worker = aq_release(job_id, leases, active)
    local left = aq_attempts_left(job_key)
    local err = 'lease expired'
    redis.call('HSET', job_key, 'error', err)
    if left > 0 then
      local used = tonumber(cur[2]) - tonumber(cur[3])
      local state, run_at = aq_requeue(job_key, job_id, aq_backoff_ms(used, base_ms, max_ms, spread),
        now, delayed, ready, timers)
      local data = '{"attempt":' .. cur[2] .. ',"state":"' .. state .. '"'
      if worker then data = data .. ',"workerId":' .. aq_jstr(worker) end
      if run_at then data = data .. ',"runAt":' .. aq_int(run_at) end
      aq_append(log, job_key, job_id, 'JobStalled', actor, now, data .. '}')
      aq_count(counts, 'active', state)
    else
      redis.call('HSET', job_key, 'state', 'failed', 'finishedAt', aq_int(now))
      aq_append(log, job_key, job_id, 'JobFailed', actor, now,
        '{"attempt":' .. cur[2] .. ',"error":"' .. err .. '","reason":"lease_expired"}')
      aq_count(counts, 'active', 'failed')
    end
    reclaimed[#reclaimed + 1] = job_id
  end
end
return reclaimed
