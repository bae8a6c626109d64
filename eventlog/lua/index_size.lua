-- How many ids a paged index (_lib.lua) holds, KEYS[1]: its pages' and a
-- legacy index's (kept whole by a version before; an id moved from it is in
-- one or the other), and how many pages.
local ix = KEYS[1]
local starts = redis.call('ZRANGE', ix .. '#', 0, -1)
local size = redis.call('ZCARD', ix)
for _, start in ipairs(starts) do
  size = size + redis.call('ZCARD', ix .. '#p' .. start)
end
return { size, #starts }
