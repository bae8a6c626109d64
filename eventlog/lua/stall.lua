-- Reclaim active jobs whose lease has expired, by the server's clock. The
-- attempt is used up: the job goes back to run again, or fails when none are left.
-- Two ways to name the candidates: ARGV[4] a count n, then per job i its id
-- ARGV[3 + 2i] and jitter spread ARGV[4 + 2i], its record KEYS[9 + i]; or
-- ARGV[4] = 'due', ARGV[5] the partition's job-key prefix, ARGV[6] a limit and
-- ARGV[7] a seed for the jitter: the script picks the expired leases itself
-- (their record keys share the partition's hash tag), so no caller's clock is asked.
-- Returns the ids reclaimed, the next lease deadline (ms, or '') and the
-- server's time (ms) the script judged by.
local counts, log, leases, active, delayed = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local ready = { h = KEYS[6], n = KEYS[7], l = KEYS[8] }
local actor, base_ms, max_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

local now = aq_now_us()
local now_ms = math.floor(now / 1000)
local ids, job_keys, spreads = {}, {}, {}
if ARGV[4] == 'due' then
  local prefix = ARGV[5]
  math.randomseed(tonumber(ARGV[7]))
  ids = redis.call('ZRANGEBYSCORE', leases, '-inf', aq_int(now_ms), 'LIMIT', 0, tonumber(ARGV[6]))
  for i, job_id in ipairs(ids) do
    job_keys[i], spreads[i] = prefix .. job_id, math.random()
  end
else
  for i = 1, tonumber(ARGV[4]) do
    ids[i], job_keys[i], spreads[i] = ARGV[3 + 2 * i], KEYS[9 + i], tonumber(ARGV[4 + 2 * i])
  end
end
local reclaimed = {}
for i, job_id in ipairs(ids) do
  local job_key, spread = job_keys[i], spreads[i]
  local deadline = tonumber(redis.call('ZSCORE', leases, job_id))
  local cur = redis.call('HMGET', job_key, 'state', 'attempt', 'budgetFrom')
  if deadline and deadline <= now_ms and cur[1] == 'active' then
    local worker = aq_release(job_id, leases, active)
    local left = aq_attempts_left(job_key)
    local err = 'lease expired'
    redis.call('HSET', job_key, 'error', err)
    if left > 0 then
      local used = tonumber(cur[2]) - tonumber(cur[3])
      local state, run_at = aq_requeue(job_key, job_id, aq_backoff_ms(used, base_ms, max_ms, spread),
        now, delayed, ready)
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
local head = redis.call('ZRANGE', leases, 0, 0, 'WITHSCORES')
return { reclaimed, head[2] or '', aq_int(now_ms) }
