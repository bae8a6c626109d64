-- delayed -> queued for jobs whose run time has come (by the server's clock;
-- the caller read the candidates). Returns the ids moved and the next run time.
local counts, log, delayed = KEYS[1], KEYS[2], KEYS[5]
local ready = { h = KEYS[6], n = KEYS[7], l = KEYS[8] }
local actor, n = ARGV[1], tonumber(ARGV[2])
-- Per job i: KEYS[9 + i] its record; ARGV[2 + i] job id.

local now = aq_now_us()
local moved = {}
for i = 1, n do
  local job_key, job_id = KEYS[9 + i], ARGV[2 + i]
  local due = tonumber(redis.call('ZSCORE', delayed, job_id))
  if due and due <= now / 1000 then
    redis.call('ZREM', delayed, job_id)
    local cur = redis.call('HMGET', job_key, 'state', 'prio')
    if cur[1] == 'delayed' then
      redis.call('XADD', ready[cur[2]], '*', 'j', job_id)
      redis.call('HSET', job_key, 'state', 'queued', 'queuedAt', aq_int(now))
      redis.call('HDEL', job_key, 'runAt')
      aq_append(log, job_key, job_id, 'JobQueued', actor, now, '{"reason":"due"}')
      aq_count(counts, 'delayed', 'queued')
      moved[#moved + 1] = job_id
    end
  end
end
local head = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
return { moved, head[2] or '' }
