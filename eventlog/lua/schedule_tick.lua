-- Moves a schedule past the tick just dispatched for it, only while its next
-- tick is still that one: a second process that dispatched the same tick (the
-- idempotency key made it the same job), a pause or a removal meanwhile leave
-- it as it is. ARGV: name, the tick (ms), the next tick (ms; '' when the cron
-- fires no more), what the tick did (a job id, or '!<refusal code>').
-- Returns 1 when moved, 0 when not.
local next_ticks, last = KEYS[1], KEYS[2]
local name, tick, next_ms, outcome = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local current = redis.call('ZSCORE', next_ticks, name)
if not current or tonumber(current) ~= tonumber(tick) then return 0 end
if next_ms == '' then
  redis.call('ZREM', next_ticks, name)
else
  redis.call('ZADD', next_ticks, next_ms, name)
end
redis.call('HSET', last, name, tick .. ' ' .. outcome)
return 1
