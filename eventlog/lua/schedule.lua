-- One change of a schedule and its event, in one step: ARGV[1] is 'add',
-- 'remove', 'pause' or 'resume'. The event (type, schedule, v, at, actor, data)
-- goes to the partition's schedule log, never to its job log. Every check comes
-- before the first write. Refusals (nothing written): {'exists'} when an add
-- finds the name taken; {'not_found'} when the partition holds no such
-- schedule; {'invalid_state', 'paused' | 'active'} for a pause of a paused
-- schedule or a resume of an active one. Else {'ok', server time (ms)}.
-- An add or a resume rings the doorbell with the next tick as a run time
-- ('<agent> d<ms>'), so whoever serves the partition wakes for it.
local schedules, next_ticks, last, slog = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local op, name, actor, data = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local next_ms, definition = ARGV[5], ARGV[6]
local ring, agent = ARGV[7], ARGV[8]

local now = aq_now_us()
local exists = redis.call('HEXISTS', schedules, name) == 1
local active = redis.call('ZSCORE', next_ticks, name)
local etype
if op == 'add' then
  if exists then return { 'exists' } end
  etype = 'ScheduleAdded'
else
  if not exists then return { 'not_found' } end
  if op == 'pause' then
    if not active then return { 'invalid_state', 'paused' } end
    etype = 'SchedulePaused'
  elseif op == 'resume' then
    if active then return { 'invalid_state', 'active' } end
    etype = 'ScheduleResumed'
  else
    etype = 'ScheduleRemoved'
  end
end

if op == 'add' then
  redis.call('HSET', schedules, name, definition)
  redis.call('ZADD', next_ticks, next_ms, name)
elseif op == 'resume' then
  redis.call('ZADD', next_ticks, next_ms, name)
elseif op == 'pause' then
  redis.call('ZREM', next_ticks, name)
else
  redis.call('HDEL', schedules, name)
  redis.call('ZREM', next_ticks, name)
  redis.call('HDEL', last, name)
end
redis.call('XADD', slog, '*', 'type', etype, 'schedule', name, 'v', '1',
  'at', aq_int(now), 'actor', actor, 'data', data)
if op == 'add' or op == 'resume' then
  -- After the writes: a refused PUBLISH (an ACL without the channel) must not
  -- turn them into an error; the sweep finds the schedule then.
  redis.pcall('PUBLISH', ring, agent .. ' d' .. next_ms)
end
return { 'ok', aq_int(math.floor(now / 1000)) }
