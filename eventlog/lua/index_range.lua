-- Read a paged index (_lib.lua) in id order: KEYS[1] the index. ARGV[1] the
-- bound, exclusive ('(<id>') or none ('-' reading forward, '+' reading
-- back); ARGV[2] at most this many ids; ARGV[3] '1' to read forward (the
-- smallest ids first), else back (the greatest first). Returns the ids read
-- from the pages and, apart, those of a legacy index (one sorted set kept by
-- a version before, read the same way): the caller merges the two.
local ix, bound, count, forward = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'
local dir = aq_dir(ix)
local found = {}
local start
if bound == '-' or bound == '+' then
  start = redis.call(forward and 'ZRANGE' or 'ZREVRANGE', dir, 0, 0)[1]
else
  start = aq_page_start(dir, string.sub(bound, 2))
end
while start do
  local page = aq_page(ix, start)
  local ids
  if forward then
    ids = redis.call('ZRANGEBYLEX', page, bound, '+', 'LIMIT', 0, count - #found)
  else
    ids = redis.call('ZREVRANGEBYLEX', page, bound, '-', 'LIMIT', 0, count - #found)
  end
  for _, id in ipairs(ids) do
    found[#found + 1] = id
  end
  if #found >= count then break end
  -- The next page: the one after (forward) or before (back) in the directory.
  if forward then
    start = aq_page_after(dir, start)
  else
    start = aq_page_before(dir, start)
  end
end
local legacy = {}
if redis.call('EXISTS', ix) == 1 then
  if forward then
    legacy = redis.call('ZRANGEBYLEX', ix, bound, '+', 'LIMIT', 0, count)
  else
    legacy = redis.call('ZREVRANGEBYLEX', ix, bound, '-', 'LIMIT', 0, count)
  end
end
return { found, legacy }
