-- The ids a partition's dispatcher index (paged, _lib.lua) and one of its
-- state indexes both hold, into a short-lived sorted set (all scores 0), for
-- a list filtered by dispatcher and state: KEYS[1] the set made, KEYS[2] the
-- dispatcher's index, KEYS[3] the state's (paged when ARGV[1] is '1', else a
-- sorted set). ARGV[2]: the most ids to walk; ARGV[3]: the set's time to
-- live (ms). The smaller index is walked and the other asked for each of its
-- ids. Returns how many both hold, or -1 when the smaller holds more than
-- ARGV[2] (nothing is made: the caller reads the dispatcher's index instead
-- and sifts by state, which a filter matching so many answers soon).
local made, by, state = KEYS[1], KEYS[2], KEYS[3]
local state_paged, most, ttl = ARGV[1] == '1', tonumber(ARGV[2]), tonumber(ARGV[3])

-- Every id of an index, its pages' then a legacy one's.
local function all(ix, paged)
  if not paged then
    return redis.call('ZRANGE', ix, 0, -1)
  end
  local ids = {}
  for _, start in ipairs(redis.call('ZRANGE', ix .. '#', 0, -1)) do
    for _, id in ipairs(redis.call('ZRANGE', ix .. '#p' .. start, 0, -1)) do
      ids[#ids + 1] = id
    end
  end
  for _, id in ipairs(redis.call('ZRANGE', ix, 0, -1)) do
    ids[#ids + 1] = id
  end
  return ids
end

local by_size = aq_pages_size(by)
local state_size = state_paged and aq_pages_size(state) or redis.call('ZCARD', state)
if math.min(by_size, state_size) > most then
  return -1
end
local walked, walked_paged, asked, asked_paged = by, true, state, state_paged
if state_size < by_size then
  walked, walked_paged, asked, asked_paged = state, state_paged, by, true
end
local ids = all(walked, walked_paged)
local both = {}
if asked_paged then
  for at, held in ipairs(aq_pages_has(asked, ids)) do
    if held then both[#both + 1] = ids[at] end
  end
else
  for _, id in ipairs(ids) do
    if redis.call('ZSCORE', asked, id) then both[#both + 1] = id end
  end
end
redis.call('DEL', made)
local members = {}
for _, id in ipairs(both) do
  members[#members + 1] = 0
  members[#members + 1] = id
  if #members >= 1000 then
    redis.call('ZADD', made, unpack(members))
    members = {}
  end
end
if #members > 0 then
  redis.call('ZADD', made, unpack(members))
end
if #both > 0 then
  redis.call('PEXPIRE', made, ttl)
end
return #both
