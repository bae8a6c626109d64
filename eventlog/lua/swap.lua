-- Swap a partition's rebuilt views in, in one step: KEYS[1..n] the rebuilt
-- keys, KEYS[n+1..2n] the live keys each replaces, KEYS[2n+1..] live keys
-- the rebuild did not make (deleted). A rebuilt key that was never written (an
-- empty index) empties the live one. Returns n.
local n = tonumber(ARGV[1])

local made = {}
for i = 1, n do
  made[i] = redis.call('EXISTS', KEYS[i]) == 1
end

for i = 2 * n + 1, #KEYS do
  redis.call('DEL', KEYS[i])
end
for i = 1, n do
  if made[i] then
    redis.call('RENAME', KEYS[i], KEYS[n + i])
  else
    redis.call('DEL', KEYS[n + i])
  end
end
return n
