-- Take `n` dispatches from a caller's rolling 60-second window, or refuse
-- them all. Runs in the caller's own slot, before the dispatch.
local window = KEYS[1]
local max, n, token, window_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', window, '-inf', now_ms - window_ms)
local used = redis.call('ZCARD', window)
if used + n > max then
  return { 0, used }
end
for i = 1, n do
  redis.call('ZADD', window, now_ms, token .. ':' .. i)
end
redis.call('PEXPIRE', window, window_ms)
return { 1, used }
