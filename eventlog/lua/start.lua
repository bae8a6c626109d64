-- queued -> active for a batch of ready entries read by one worker. An entry
-- whose job is no longer queued (cancelled, drained, already taken) is
-- acknowledged and dropped. Each started job gets attempt + 1 and a lease.
local counts, log, leases, active = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ready = { h = KEYS[6], n = KEYS[7], l = KEYS[8] }
local worker, lease_ms, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
-- Per job i: KEYS[8 + i] its record; ARGV[4 + 3(i-1)] job id, priority code, entry id.

local now = aq_now_us()
local reply = {}
for i = 1, n do
  local job_key, a = KEYS[8 + i], 4 + 3 * (i - 1)
  local job_id, code, entry = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local state = redis.call('HGET', job_key, 'state')
  if state ~= 'queued' or redis.call('HEXISTS', active, job_id) == 1 then
    redis.call('XACK', ready[code], 'workers', entry)
    redis.call('XDEL', ready[code], entry)
    reply[i] = { job_id, 'skipped', state or 'missing' }
  else
    local attempt = tonumber(redis.call('HGET', job_key, 'attempt')) + 1
    redis.call('HSET', job_key, 'state', 'active', 'attempt', aq_int(attempt), 'startedAt', aq_int(now))
    redis.call('HDEL', job_key, 'progress', 'runAt')
    aq_append(log, job_key, job_id, 'JobStarted', worker, now,
      '{"attempt":' .. aq_int(attempt) .. ',"workerId":' .. aq_jstr(worker)
      .. ',"leaseSeconds":' .. (lease_ms / 1000) .. '}')
    redis.call('ZADD', leases, math.floor(now / 1000) + lease_ms, job_id)
    redis.call('HSET', active, job_id, code .. ' ' .. entry .. ' ' .. worker)
    aq_count(counts, 'queued', 'active')
    reply[i] = { job_id, 'started', redis.call('HGETALL', job_key) }
  end
end
return reply
