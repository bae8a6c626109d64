-- queued -> active: take up to `want` entries from the ready streams, high
-- priority first, through the `workers` group, and start each one's job
-- (attempt + 1, a lease). Every entry read is acknowledged and deleted here,
-- so no entry is ever delivered without its job being started: an entry whose
-- job is no longer queued (cancelled, drained) is simply dropped.
-- The job ids come from the entries, so their record keys are made from the
-- partition's job-key prefix (ARGV[4]); they share the partition's hash tag.
local counts, log, leases, active = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local streams = { KEYS[6], KEYS[7], KEYS[8] }
local codes = { 'h', 'n', 'l' }
local worker, lease_ms, want, job_prefix = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local spec_prefix = ARGV[5]

local tails = {}  -- a stream read to its end -> its last entry id
-- Every check before the first write (Redis does not roll a script back):
-- reading a stream through its group is a write, so each stream that may be
-- read must have the group before any is read. Entries are deleted as they
-- are taken: an empty stream has nothing to read (and XLEN costs far less
-- than XREADGROUP inside a script).
for s = 1, 3 do
  if redis.call('XLEN', streams[s]) == 0 then
    tails[s] = '0-0'
  elseif redis.pcall('XPENDING', streams[s], 'workers').err then
    return redis.error_reply('NOGROUP No workers group on ' .. streams[s])
  end
end

local now = aq_now_us()
local lease_until = math.floor(now / 1000) + lease_ms
local started = {}
for s = 1, 3 do
  while #started < want and not tails[s] do
    local asked = want - #started
    local read = redis.call('XREADGROUP', 'GROUP', 'workers', worker, 'COUNT', asked,
      'STREAMS', streams[s], '>')
    if not read then break end
    local entries = read[1][2]
    local entry_ids = {}
    for _, entry in ipairs(entries) do
      local job_id = entry[2][2]
      entry_ids[#entry_ids + 1] = entry[1]
      local job_key = job_prefix .. job_id
      local cur = redis.call('HMGET', job_key, 'state', 'attempt', 'events', 'progress', 'runAt')
      if cur[1] == 'queued' then
        local attempt = aq_int(tonumber(cur[2]) + 1)
        local events = aq_event(log, job_id, 'JobStarted', worker, now,
          '{"attempt":' .. attempt .. ',"workerId":' .. aq_jstr(worker)
          .. ',"leaseSeconds":' .. (lease_ms / 1000) .. '}', cur[3])
        redis.call('HSET', job_key, 'state', 'active', 'attempt', attempt,
          'startedAt', aq_int(now), 'events', events)
        if cur[4] or cur[5] then
          redis.call('HDEL', job_key, 'progress', 'runAt')
        end
        redis.call('ZADD', leases, lease_until, job_id)
        redis.call('HSET', active, job_id, codes[s] .. ' ' .. worker)
        started[#started + 1] = { job_id, redis.call('HGETALL', job_key),
          aq_spec(spec_prefix .. job_id, job_key) }
      end
    end
    redis.call('XACK', streams[s], 'workers', unpack(entry_ids))
    redis.call('XDEL', streams[s], unpack(entry_ids))
    if #entries < asked then
      -- Fewer than asked: the stream was read to its end.
      tails[s] = entry_ids[#entry_ids]
      break
    end
  end
end
if #started > 0 then
  bell_lease = lease_until
  redis.call('HINCRBY', counts, 'queued', -#started)
  redis.call('HINCRBY', counts, 'active', #started)
end

-- With fewer started than wanted, the streams were read to their ends: where
-- each ends is returned, and the worker blocks on XREAD from there, so an
-- entry added after this script cannot be missed.
if #started < want then
  for s = 1, 3 do
    if not tails[s] then
      local last = redis.call('XREVRANGE', streams[s], '+', '-', 'COUNT', 1)
      tails[s] = last[1] and last[1][1] or '0-0'
    end
  end
else
  tails = {}
end
return { started, tails }
