-- One look at a partition for whoever serves its background work: where its
-- log ends, where each consumer group named in ARGV stands, and when its next
-- delayed job and its next lease fall due. Writes nothing. Used when a process
-- starts serving a partition, after a re-subscription to the doorbell, and by
-- the slow sweep that catches a ring pub/sub dropped.
-- Returns the server's time (ms), the log's last entry id ('' when empty), the
-- next run time (the earlier of the next delayed job and the next schedule
-- tick: both are the scheduler's) and the next lease deadline (ms, or ''),
-- then per group of
-- ARGV: '<entries pending> <last delivered id>', or '' when it has no group.
local log, delayed, leases, schedule_next = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

local now_ms = math.floor(aq_now_us() / 1000)
local last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
local reply = { aq_int(now_ms), last[1] and last[1][1] or '' }
local head = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
reply[3] = head[2] or ''
if schedule_next then
  local tick = redis.call('ZRANGE', schedule_next, 0, 0, 'WITHSCORES')
  if tick[2] and (reply[3] == '' or tonumber(tick[2]) < tonumber(reply[3])) then
    reply[3] = tick[2]
  end
end
head = redis.call('ZRANGE', leases, 0, 0, 'WITHSCORES')
reply[4] = head[2] or ''

local found = {}
local groups = redis.pcall('XINFO', 'GROUPS', log)
if not groups.err then
  for _, group in ipairs(groups) do
    local fields = {}
    for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
    found[fields['name']] = fields['pending'] .. ' ' .. fields['last-delivered-id']
  end
end
for i = 1, #ARGV do
  reply[4 + i] = found[ARGV[i]] or ''
end
return reply
