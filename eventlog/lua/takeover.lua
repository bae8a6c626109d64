-- Take over what dead consumers of a group hold, and remove them from it.
local stream = KEYS[1]
local group, taker, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
-- ARGV[4..]: the dead consumers. Each one's pending entries (at most `limit`)
-- move to `taker` whatever their idle time; a consumer left with nothing
-- pending is deleted from the group in the same step, so none of its entries
-- is ever dropped (DELCONSUMER drops a consumer's pending entries). Returns
-- the number of entries taken over.

local held = {}
for i = 4, #ARGV do
  local ids = {}
  for j, entry in ipairs(redis.call('XPENDING', stream, group, '-', '+', limit, ARGV[i])) do
    ids[j] = entry[1]
  end
  held[i] = ids
end
local taken = 0
for i = 4, #ARGV do
  local ids = held[i]
  if #ids > 0 then
    local claim = { 'XCLAIM', stream, group, taker, 0 }
    for _, id in ipairs(ids) do claim[#claim + 1] = id end
    claim[#claim + 1] = 'JUSTID'
    redis.call(unpack(claim))
    taken = taken + #ids
  end
  if #ids < limit then
    redis.call('XGROUP', 'DELCONSUMER', stream, group, ARGV[i])
  end
end
return taken
