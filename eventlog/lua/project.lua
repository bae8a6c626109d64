-- Apply a batch of one partition's events to its views, and move the
-- projection's position past them, in one atomic step. Events at or before
-- the position were applied already and are skipped: applying twice changes
-- nothing, so the projector and a query catching up may race freely. A batch
-- that does not follow the position directly is refused (-1) and nothing is
-- written: the events between would be lost, since the position only moves
-- forward (a consumer group may hand batches out of log order, and a rebuild
-- may swap in views with an earlier position at any time).
-- Every job is in exactly one state index, so their union is the index of
-- every job (a version before kept that as a ninth index, idx:all).
local proj, log = KEYS[1], KEYS[2]
local state_keys = {}
for i = 3, 10 do
  state_keys[#state_keys + 1] = KEYS[i]
end
-- In the order of schemas.words.STATES.
local state_index = {
  pending_approval = KEYS[3], waiting_dependencies = KEYS[4], delayed = KEYS[5],
  queued = KEYS[6], active = KEYS[7], completed = KEYS[8], failed = KEYS[9],
  cancelled = KEYS[10],
}
-- KEYS[11..] the dispatchers' indexes of the partition. ARGV[1]: one line per
-- event, "<event id> <job id> <state after or -> <states it may leave, comma-
-- separated, or -> <at µs> <dispatcher index or 0>" (the index counts from 1
-- over KEYS[11..]; 0 when the event is no dispatch). One packed argument costs
-- far less to send than six per event, and naming the states an event can come
-- from spares a ZREM on every state index. ARGV[2]: the event the batch
-- directly follows in the log, when the caller read it so (XRANGE from there);
-- '' when it does not know, and then the log itself is checked for a gap
-- before each event applied. A state this version has no index for (written
-- by a newer one) is left out of the state indexes. ARGV[3]: the events' types,
-- one per line of ARGV[1], space-separated ('' when the caller does not count):
-- each new event adds one to `n:<type>` in the projection's hash, in this same
-- step, so an event is counted once (agentq_jobs_total).

local function after(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, bms = tonumber(ams), tonumber(bms)
  return ams > bms or (ams == bms and tonumber(aseq) > tonumber(bseq))
end

local pos = redis.call('HGET', proj, 'pos') or '0-0'
local follows = ARGV[2]
local types = {}
for kind in string.gmatch(ARGV[3] or '', '%S+') do
  types[#types + 1] = kind
end
local seen = 0

-- Every read and check first: which events are new, and that none is missing.
-- A batch read from `follows` on holds every event after it, so the position
-- must not be before `follows`; past it, the position is one of the batch's.
if follows ~= '' and after(follows, pos) then
  return -1
end
local todo = {}
local last = pos
local pattern = '(%S+) (%S+) (%S+) (%S+) (%S+) (%d+)'
for event_id, job_id, state, from, at, by in string.gmatch(ARGV[1], pattern) do
  seen = seen + 1
  if after(event_id, pos) then
    if follows == '' and
        #redis.call('XRANGE', log, '(' .. last, '(' .. event_id, 'COUNT', 1) > 0 then
      return -1
    end
    todo[#todo + 1] = { job_id, state, from, at, tonumber(by), types[seen] }
    last = event_id
  end
end

-- The dispatchers' indexes and the terminal states' are paged (_lib.lua):
-- what the batch leaves each job's membership at is applied at the end, a
-- paged index at a time (the last word on a job wins: adding and taking out
-- change nothing else). The other five states' indexes are single sorted sets.
local paged = { [KEYS[8]] = true, [KEYS[9]] = true, [KEYS[10]] = true }
for i = 11, #KEYS do
  paged[KEYS[i]] = true
end
local touched, listed = {}, {}  -- paged index -> job ids in the order met; -> id -> in?

local function put(key, job_id, inside)
  if not paged[key] then
    if inside then
      redis.call('ZADD', key, 0, job_id)
    else
      redis.call('ZREM', key, job_id)
    end
    return
  end
  if not listed[key] then
    touched[#touched + 1] = key
    listed[key] = { order = {} }
  end
  local ids = listed[key]
  if ids[job_id] == nil then
    ids.order[#ids.order + 1] = job_id
  end
  ids[job_id] = inside
end

for _, event in ipairs(todo) do
  local job_id, state, from, by = event[1], event[2], event[3], event[5]
  if by > 0 then
    put(KEYS[10 + by], job_id, true)
  end
  if state ~= '-' then
    if from == '*' then
      for _, key in ipairs(state_keys) do
        put(key, job_id, false)
      end
    elseif from ~= '-' then
      for previous in string.gmatch(from, '[^,]+') do
        if state_index[previous] then
          put(state_index[previous], job_id, false)
        end
      end
    end
    if state_index[state] then
      put(state_index[state], job_id, true)
    end
  end
end
for _, key in ipairs(touched) do
  local ids, adds, rems = listed[key], {}, {}
  for _, job_id in ipairs(ids.order) do
    if ids[job_id] then adds[#adds + 1] = job_id else rems[#rems + 1] = job_id end
  end
  aq_pages_migrate(key, 200)
  if #rems > 0 then aq_pages_rem(key, rems) end
  if #adds > 0 then aq_pages_add(key, adds) end
end
if #todo > 0 then
  redis.call('HSET', proj, 'pos', last, 'lastActivityAt', todo[#todo][4])
  local tally = {}
  for _, event in ipairs(todo) do
    if event[6] then
      tally[event[6]] = (tally[event[6]] or 0) + 1
    end
  end
  for kind, n in pairs(tally) do
    redis.call('HINCRBY', proj, 'n:' .. kind, n)
  end
end
return #todo
