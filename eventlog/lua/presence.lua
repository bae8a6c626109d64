-- A process's heartbeat in the process registry, by the server's clock.
local registry = KEYS[1]
local name, timeout_ms, forget_ms, leaving = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
-- ARGV[2]: how long the process lives without another beat (ms); ARGV[3]: how
-- long a dead process stays listed (ms); ARGV[4] = '1': the process is stopping,
-- so it is marked dead at once and others take over and forget its consumers.
-- Returns the server's time (ms) and the registry as it was (name, deadline, ...).

local now_ms = math.floor(aq_now_us() / 1000)
local listed = redis.call('ZRANGE', registry, 0, -1, 'WITHSCORES')
if leaving == '1' then
  redis.call('ZADD', registry, now_ms - 1, name)
else
  redis.call('ZADD', registry, now_ms + timeout_ms, name)
end
redis.call('ZREMRANGEBYSCORE', registry, '-inf', '(' .. aq_int(now_ms - forget_ms))
return { aq_int(now_ms), listed }
