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
-- KEYS[10..] the dispatchers' indexes of the partition. ARGV[1]: one line per
-- event, "<event id> <job id> <state after or -> <states it may leave, comma-
-- separated, or -> <at µs> <dispatcher index or 0>" (the index counts from 1
-- over KEYS[10..]; 0 when the event is no dispatch). One packed argument costs
-- far less to send than six per event, and naming the states an event can come
-- from spares a ZREM on every state index.

local function after(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, bms = tonumber(ams), tonumber(bms)
  return ams > bms or (ams == bms and tonumber(aseq) > tonumber(bseq))
end

local pos = redis.call('HGET', proj, 'pos') or '0-0'
local last_at = nil
local applied = 0
local pattern = '(%S+) (%S+) (%S+) (%S+) (%S+) (%d+)'
for event_id, job_id, state, from, at, by in string.gmatch(ARGV[1], pattern) do
  if after(event_id, pos) then
    by = tonumber(by)
    if by > 0 then
      redis.call('ZADD', all, 0, job_id)
      redis.call('ZADD', KEYS[9 + by], 0, job_id)
    end
    if state ~= '-' then
      if from == '*' then
        for _, key in ipairs(state_keys) do
          redis.call('ZREM', key, job_id)
        end
      elseif from ~= '-' then
        for previous in string.gmatch(from, '[^,]+') do
          redis.call('ZREM', state_index[previous], job_id)
        end
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
