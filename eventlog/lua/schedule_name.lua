-- The global index of schedule names (name -> '<target> <ms claimed>'), so that
-- a name is unique across agents. ARGV[1]:
--   'claim' name target: claims a free name; else says who holds it;
--   'take' name target held: takes the name over only while it is still
--     'held' (a stray whose add was cut short);
--   'release' name target: frees the name while it is held for that target.
-- Returns {'claimed'} or {'held', value ('' when none), server time (ms)}
-- (claim, take), or 1/0 (release).
local names = KEYS[1]
local op, name, target = ARGV[1], ARGV[2], ARGV[3]

local now_ms = math.floor(aq_now_us() / 1000)
local held = redis.call('HGET', names, name)
if op == 'release' then
  if held and string.sub(held, 1, #target + 1) == target .. ' ' then
    redis.call('HDEL', names, name)
    return 1
  end
  return 0
end
if (op == 'claim' and not held) or (op == 'take' and held == ARGV[4]) then
  redis.call('HSET', names, name, target .. ' ' .. aq_int(now_ms))
  return { 'claimed' }
end
return { 'held', held or '', aq_int(now_ms) }
