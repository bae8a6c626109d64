-- Add ids to a paged index (_lib.lua), or take them out: KEYS[1] the index,
-- ARGV[1] '+' to add or '-' to take out, ARGV[2] the ids, separated by
-- spaces. Returns how many were added (not held before) or taken out.
local ix = KEYS[1]
local ids = {}
for id in string.gmatch(ARGV[2], '%S+') do
  ids[#ids + 1] = id
end
if ARGV[1] == '+' then
  return aq_pages_add(ix, ids)
end
return aq_pages_rem(ix, ids)
