-- What `/metrics` shows of one partition, in one step (reads only): the jobs
-- per state (the counts hash), the live workers (heartbeat deadlines judged by
-- this server's TIME) and the projection's hash, whose `n:<type>` fields count
-- the events applied per type.
local counts, proj, workers = KEYS[1], KEYS[2], KEYS[3]

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return { redis.call('HGETALL', counts), redis.call('ZCOUNT', workers, '(' .. now_ms, '+inf'),
  redis.call('HGETALL', proj) }
