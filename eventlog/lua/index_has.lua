-- Which of some ids a paged index (_lib.lua) holds: KEYS[1] the index, ARGV[1]
-- the ids, separated by spaces. Returns one character per id, '1' when held
-- (by its pages, or by a legacy index kept whole), else '0'.
local ids = {}
for id in string.gmatch(ARGV[1], '%S+') do
  ids[#ids + 1] = id
end
local held = aq_pages_has(KEYS[1], ids)
for at = 1, #held do
  held[at] = held[at] and '1' or '0'
end
return table.concat(held)
