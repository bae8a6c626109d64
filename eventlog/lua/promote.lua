-- delayed -> queued for jobs whose run time has come, by the server's clock.
-- Two ways to name the candidates: ARGV[2] a count n, then n job ids in ARGV
-- and their records in KEYS[10..]; or ARGV[2] = 'due', ARGV[3] the partition's
-- job-key prefix and ARGV[4] a limit: the script picks the due jobs itself
-- (their record keys share the partition's hash tag), so no caller's clock is
-- ever asked what is due. Returns the ids moved, the next run time (ms, or ''),
-- and the server's time (ms) the script judged by.
local counts, log, delayed = KEYS[1], KEYS[2], KEYS[5]
local ready = { h = KEYS[6], n = KEYS[7], l = KEYS[8] }
local actor = ARGV[1]

local now = aq_now_us()
local now_ms = math.floor(now / 1000)
local ids, job_keys = {}, {}
if ARGV[2] == 'due' then
  local prefix = ARGV[3]
  ids = redis.call('ZRANGEBYSCORE', delayed, '-inf', aq_int(now_ms), 'LIMIT', 0, tonumber(ARGV[4]))
  for i, job_id in ipairs(ids) do job_keys[i] = prefix .. job_id end
else
  for i = 1, tonumber(ARGV[2]) do
    ids[i], job_keys[i] = ARGV[2 + i], KEYS[9 + i]
  end
end

local moved = {}
for i, job_id in ipairs(ids) do
  local job_key = job_keys[i]
  local due = tonumber(redis.call('ZSCORE', delayed, job_id))
  if due and due <= now_ms then
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
return { moved, head[2] or '', aq_int(now_ms) }
