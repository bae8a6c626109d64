-- Which of some ids a paged index (_lib.lua) holds: KEYS[1] the index, ARGV[1]
-- the ids, separated by spaces. Returns one character per id, '1' when held
-- (by its pages, or by a legacy index kept whole), else '0'. The page that
-- held the id before is asked first (an id is in one page at most): ids in
-- order that are held cost one look at the directory a page, not one an id.
local ix = KEYS[1]
local dir = ix .. '#'
local legacy = redis.call('EXISTS', ix) == 1
local held, page = {}, nil
for id in string.gmatch(ARGV[1], '%S+') do
  local found = page and redis.call('ZSCORE', page, id)
  if not found then
    local its = ix .. '#p' .. aq_page_start(dir, id)
    found = its ~= page and redis.call('ZSCORE', its, id)
    if found then page = its end
  end
  if found or (legacy and redis.call('ZSCORE', ix, id)) then
    held[#held + 1] = '1'
  else
    held[#held + 1] = '0'
  end
end
return table.concat(held)
