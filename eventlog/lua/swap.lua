-- Swap a partition's rebuilt views in, in one step: KEYS[1..n] the rebuilt
-- views, KEYS[n+1..2n] the live views each replaces, KEYS[2n+1..] live
-- views the rebuild did not make (deleted). A view is a key, or a paged index
-- (_lib.lua: its directory and pages, and a legacy key kept whole): each of
-- its keys is renamed or deleted. A rebuilt view never written (an empty
-- index) empties the live one. Returns n.
local n = tonumber(ARGV[1])

-- Delete a view: the key, and a paged index's pages and directory.
local function drop(view)
  for _, start in ipairs(redis.call('ZRANGE', view .. '#', 0, -1)) do
    redis.call('DEL', view .. '#p' .. start)
  end
  redis.call('DEL', view, view .. '#')
end

-- Rename a view's keys to another view's names (which hold nothing).
local function move(from, to)
  if redis.call('EXISTS', from) == 1 then
    redis.call('RENAME', from, to)
  end
  for _, start in ipairs(redis.call('ZRANGE', from .. '#', 0, -1)) do
    if redis.call('EXISTS', from .. '#p' .. start) == 1 then
      redis.call('RENAME', from .. '#p' .. start, to .. '#p' .. start)
    end
  end
  if redis.call('EXISTS', from .. '#') == 1 then
    redis.call('RENAME', from .. '#', to .. '#')
  end
end

for i = 2 * n + 1, #KEYS do
  drop(KEYS[i])
end
for i = 1, n do
  drop(KEYS[n + i])
  move(KEYS[i], KEYS[n + i])
end
return n
