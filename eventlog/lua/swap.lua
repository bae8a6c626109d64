-- Swap a partition's rebuilt views in, in one step: KEYS[1..n] the rebuilt
-- views, KEYS[n+1..2n] the live views each replaces, KEYS[2n+1..] live
-- views the rebuild did not make (deleted). A view is a key, or a paged index
-- (_lib.lua: its directory and pages, and a legacy key kept whole): each of
-- its keys is renamed or deleted. A rebuilt view never written (an empty
-- index) empties the live one. Returns n.
local n = tonumber(ARGV[1])

-- Delete a view: the key, and a paged index's pages and directory.
local function drop(view)
  for _, start in ipairs(redis.call('ZRANGE', aq_dir(view), 0, -1)) do
    redis.call('DEL', aq_page(view, start))
  end
  redis.call('DEL', view, aq_dir(view))
end

-- Rename a view's keys to another view's names (which hold nothing).
local function move(from, to)
  if redis.call('EXISTS', from) == 1 then
    redis.call('RENAME', from, to)
  end
  for _, start in ipairs(redis.call('ZRANGE', aq_dir(from), 0, -1)) do
    if redis.call('EXISTS', aq_page(from, start)) == 1 then
      redis.call('RENAME', aq_page(from, start), aq_page(to, start))
    end
  end
  if redis.call('EXISTS', aq_dir(from)) == 1 then
    redis.call('RENAME', aq_dir(from), aq_dir(to))
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
