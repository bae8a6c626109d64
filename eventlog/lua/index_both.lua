-- The ids two of a partition's indexes both hold (a dispatcher's and a
-- state's, for a list filtered by both), greatest first, read as the list
-- goes: KEYS[1] and KEYS[2] the indexes; ARGV[1] the bound, exclusive
-- ('(<id>') or none ('+'); ARGV[2] at most this many ids; ARGV[3] at most
-- this many ids looked at; ARGV[4] and ARGV[5] '1' when KEYS[1], KEYS[2] is
-- paged (_lib.lua), else a sorted set. The smaller index (by its directory's
-- size, for a paged one) is walked back from the bound and the other asked
-- for each id: the ids both hold come in order whichever is walked, so a
-- call after another may walk the other. Returns the ids both hold, the last
-- id looked at (the bound of the next call; '' when none), and 1 once the
-- walked index has no more ids below it, else 0. Returns -1 when either is
-- a paged index with a legacy key (one sorted set kept by a version before):
-- the caller reads the first index and sifts.
local bound, count, budget = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local paged = { [1] = ARGV[4] == '1', [2] = ARGV[5] == '1' }
for k = 1, 2 do
  if paged[k] and redis.call('EXISTS', KEYS[k]) == 1 then
    return -1
  end
end

-- About how many ids an index holds: a paged one's pages hold about 58 to 116.
local function about(k)
  if paged[k] then
    return redis.call('ZCARD', aq_dir(KEYS[k])) * 96
  end
  return redis.call('ZCARD', KEYS[k])
end

local w, a = 1, 2
if about(2) < about(1) then w, a = 2, 1 end
local walked, asked, dir = KEYS[w], KEYS[a], aq_dir(KEYS[w])
local start  -- the walked page (paged)
if paged[w] then
  if bound == '+' then
    start = redis.call('ZREVRANGE', dir, 0, 0)[1]
  else
    start = aq_page_start(dir, string.sub(bound, 2))
  end
end

local kept, last, looked, ended = {}, '', 0, false
while #kept < count and looked < budget do
  local want = math.min(budget - looked, 500)
  local ids
  if paged[w] then
    if not start then
      ended = true
      break
    end
    ids = redis.call('ZREVRANGEBYLEX', aq_page(walked, start), bound, '-', 'LIMIT', 0, want)
    if #ids < want then  -- on to the page before, if any
      start = aq_page_before(dir, start)
    end
  else
    ids = redis.call('ZREVRANGEBYLEX', walked, bound, '-', 'LIMIT', 0, want)
    if #ids < want then ended = true end
  end
  local held
  if #ids == 0 then
    held = {}
  elseif paged[a] then
    held = aq_pages_has(asked, ids)
  else
    held = redis.call('ZMSCORE', asked, unpack(ids))
  end
  for at, id in ipairs(ids) do
    looked, last = looked + 1, id
    if held[at] then
      kept[#kept + 1] = id
      if #kept == count then break end
    end
  end
  if last ~= '' then bound = '(' .. last end
  if ended then break end
end
if #kept == count then ended = false end
return { kept, last, ended and 1 or 0 }
