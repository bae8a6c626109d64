-- Which of some ids a paged index (_lib.lua) holds: KEYS[1] the index, ARGV[1]
-- the ids, separated by spaces. Returns one character per id, '1' when held
-- (by its pages, or by a legacy index kept whole), else '0'.
local ix = KEYS[1]
local dir = ix .. '#'
local legacy = redis.call('EXISTS', ix) == 1
local held = {}
for id in string.gmatch(ARGV[1], '%S+') do
  local page = ix .. '#p' .. aq_page_start(dir, id)
  if redis.call('ZSCORE', page, id) or (legacy and redis.call('ZSCORE', ix, id)) then
    held[#held + 1] = '1'
  else
    held[#held + 1] = '0'
  end
end
return table.concat(held)
