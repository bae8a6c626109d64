-- Take `n` dispatches from a caller's rolling window, or refuse them all.
-- Runs in the caller's own slot, before the dispatch. A place taken here is
-- pending (also in KEYS[2]) until the caller commits it (the dispatch went
-- through) or gives it back (refused). When the window is full but some of
-- its places are still pending, the answer is "busy": the caller waits for
-- them to settle, so that a dispatch refused elsewhere never refuses this one.
-- Pending places older than hold_ms are counted as dispatched (their caller died).
local window, pending = KEYS[1], KEYS[2]
local max, n, token = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local window_ms, hold_ms = tonumber(ARGV[4]), tonumber(ARGV[5])

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', window, '-inf', now_ms - window_ms)
redis.call('ZREMRANGEBYSCORE', pending, '-inf', now_ms - hold_ms)
local used = redis.call('ZCARD', window)
if used + n > max then
  local unsettled = redis.call('ZCARD', pending)
  if unsettled > 0 then
    return { 2, used - unsettled }
  end
  return { 0, used }
end
for i = 1, n do
  redis.call('ZADD', window, now_ms, token .. ':' .. i)
  redis.call('ZADD', pending, now_ms, token .. ':' .. i)
end
redis.call('PEXPIRE', window, window_ms)
redis.call('PEXPIRE', pending, window_ms)
return { 1, used }
