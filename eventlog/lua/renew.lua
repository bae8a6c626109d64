-- Extend the leases of a worker's running attempts. Returns, per job, 1 when
-- renewed and 0 when the attempt is no longer the job's current one (the
-- worker should stop it: it was cancelled or reclaimed).
local leases = KEYS[3]
local lease_ms, n = tonumber(ARGV[1]), tonumber(ARGV[2])
-- Per job i: KEYS[9 + i] its record; ARGV[2 + 2i - 1] job id, ARGV[2 + 2i] attempt.

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local reply = {}
for i = 1, n do
  local job_key, job_id, attempt = KEYS[9 + i], ARGV[1 + 2 * i], ARGV[2 + 2 * i]
  local cur = redis.call('HMGET', job_key, 'state', 'attempt')
  if cur[1] == 'active' and cur[2] == attempt and redis.call('ZSCORE', leases, job_id) then
    redis.call('ZADD', leases, now_ms + lease_ms, job_id)
    reply[i] = 1
  else
    reply[i] = 0
  end
end
return reply
