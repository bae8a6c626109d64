-- active -> queued for attempts a stopping worker hands back before they ended.
-- The attempt is not charged: budgetFrom moves up by one, so the job has as
-- many attempts left as before it started. The attempt number (the fencing
-- token) stays as it is; the next start takes the next one, and a late answer
-- from the released attempt is refused. Recorded as JobStalled with
-- "released": true. Only attempts still current and held by the caller (the
-- worker, ARGV[1]) are released; returns the ids released.
local counts, log, leases, active = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ready = { h = KEYS[6], n = KEYS[7], l = KEYS[8] }
local worker, n = ARGV[1], tonumber(ARGV[2])
-- Per job i: KEYS[9 + i] its record; ARGV[2 + 2i - 1] job id, ARGV[2 + 2i] attempt.

local held = {}
for i = 1, n do
  local job_key, job_id, attempt = KEYS[9 + i], ARGV[1 + 2 * i], ARGV[2 + 2 * i]
  local cur = redis.call('HMGET', job_key, 'state', 'attempt', 'budgetFrom', 'prio', 'events')
  local hold = redis.call('HGET', active, job_id)
  if cur[1] == 'active' and cur[2] == attempt and hold
      and string.match(hold, '^%a (.*)$') == worker then
    held[#held + 1] = { job_key, job_id, attempt, cur }
  end
end
if #held == 0 then
  return {}
end

local now = aq_now_us()
local released = {}
for _, job in ipairs(held) do
  local job_key, job_id, attempt, cur = job[1], job[2], job[3], job[4]
  aq_release(job_id, leases, active)
  redis.call('XADD', ready[cur[4]], '*', 'j', job_id)
  local events = aq_event(log, job_id, 'JobStalled', worker, now,
    '{"attempt":' .. attempt .. ',"state":"queued","workerId":' .. aq_jstr(worker)
    .. ',"released":true}', cur[5])
  redis.call('HSET', job_key, 'state', 'queued', 'queuedAt', aq_int(now),
    'budgetFrom', aq_int(tonumber(cur[3]) + 1), 'events', events)
  released[#released + 1] = job_id
end
redis.call('HINCRBY', counts, 'active', -#released)
redis.call('HINCRBY', counts, 'queued', #released)
return released
