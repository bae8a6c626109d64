-- A worker says it is alive: its entry in the partition's workers set gets the
-- deadline now + timeout, by the server's clock (ms), so that every reader
-- judges presence against Redis TIME rather than its own clock.
local workers = KEYS[1]
local worker, timeout_ms = ARGV[1], tonumber(ARGV[2])

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', workers, now_ms + timeout_ms, worker)
return now_ms + timeout_ms
