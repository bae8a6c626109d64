-- Apply a batch of one partition's events to its views, and move the
-- projection's position past them, in one atomic step. Events at or before
-- the position were applied already and are skipped: applying twice changes
-- nothing, so the projector and a query catching up may race freely.
local proj, all = KEYS[1], KEYS[2]
local state_keys = {}
for i = 3, 9 do
  state_keys[#state_keys + 1] = KEYS[i]
end
local state_index = {
  waiting_dependencies = KEYS[3], delayed = KEYS[4], queued = KEYS[5], active = KEYS[6],
  completed = KEYS[7], failed = KEYS[8], cancelled = KEYS[9],
}
local n = tonumber(ARGV[1])
-- Per event i: KEYS[9 + i] the dispatcher's index of the partition (or `all`
-- again when the event is no dispatch); ARGV[2 + 4(i-1)] event id, job id,
-- state after ('' when unchanged), time (µs).

local function after(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, bms = tonumber(ams), tonumber(bms)
  return ams > bms or (ams == bms and tonumber(aseq) > tonumber(bseq))
end

local pos = redis.call('HGET', proj, 'pos') or '0-0'
local last_at = nil
local applied = 0
for i = 1, n do
  local a = 2 + 4 * (i - 1)
  local event_id, job_id, state, at = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  if after(event_id, pos) then
    if KEYS[9 + i] ~= all then
      redis.call('ZADD', all, 0, job_id)
      redis.call('ZADD', KEYS[9 + i], 0, job_id)
    end
    if state ~= '' then
      for _, key in ipairs(state_keys) do
        redis.call('ZREM', key, job_id)
      end
      redis.call('ZADD', state_index[state], 0, job_id)
    end
    pos = event_id
    last_at = at
    applied = applied + 1
  end
end
if applied > 0 then
  redis.call('HSET', proj, 'pos', pos, 'lastActivityAt', last_at)
end
return applied
