-- What `activity` shows of one partition, read in one step from what the
-- transition scripts keep current themselves, so no view has to catch up
-- first: the jobs per state, the live workers (heartbeat deadlines judged
-- by this server's TIME), the active jobs with their specs, and when the
-- last event was appended (its `at`, read here so that only the time
-- travels, never the entry's data). Reads only.
--
-- KEYS[1] is the partition's counts; the other keys are made from the
-- partition's base (ARGV[1], the same hash tag): `activity` of every agent is
-- one call per partition, and each argument fewer is less for the client to
-- encode a thousand times.
local counts = KEYS[1]
local base = ARGV[1]
local workers, active, log, proj = base .. ':workers', base .. ':active', base .. ':log',
  base .. ':proj'
local job_prefix, spec_prefix = base .. ':job:', base .. ':spec:'

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = redis.call('ZCOUNT', workers, '(' .. now_ms, '+inf')

local last_at = false
local last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
if #last > 0 then
  local fields = last[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'at' then
      last_at = fields[i + 1]
      break
    end
  end
end
if not last_at then
  -- A log trimmed to nothing: the projection remembers the last event's time.
  last_at = redis.call('HGET', proj, 'lastActivityAt')
end

-- A job dispatched before specs had a key of their own keeps its spec in its record.
local ids = redis.call('HKEYS', active)
local specs = {}
for i, id in ipairs(ids) do
  specs[i] = redis.call('GET', spec_prefix .. id) or redis.call('HGET', job_prefix .. id, 'spec')
end
return { redis.call('HGETALL', counts), live, last_at, ids, specs }
