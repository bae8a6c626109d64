-- The schedules of a partition whose next tick has come, by the server's clock
-- (at most ARGV[1] of them). Writes nothing. Returns the server's time (ms),
-- the earliest next tick of any active schedule (ms, or ''), then per due
-- schedule its name, its tick (ms) and its definition ('' when gone).
local schedules, next_ticks = KEYS[1], KEYS[2]
local limit = tonumber(ARGV[1])

local now_ms = math.floor(aq_now_us() / 1000)
local head = redis.call('ZRANGE', next_ticks, 0, 0, 'WITHSCORES')
local reply = { aq_int(now_ms), head[2] or '' }
local due = redis.call('ZRANGEBYSCORE', next_ticks, '-inf', aq_int(now_ms), 'WITHSCORES',
  'LIMIT', 0, limit)
for i = 1, #due, 2 do
  reply[#reply + 1] = due[i]
  reply[#reply + 1] = due[i + 1]
  reply[#reply + 1] = redis.call('HGET', schedules, due[i]) or ''
end
return reply
