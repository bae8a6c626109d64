-- A process's beat when it serves partitions: its heartbeat in the process
-- registry (as presence.lua), and its leases on shards in one step. A lease
-- is the owners hash's field <shard> = the process's name; it is valid while
-- the process's deadline in the registry has not passed (by Redis TIME), so
-- this beat renews every lease the process holds, and a dead process's
-- leases lapse with its heartbeat.
local registry, owners = KEYS[1], KEYS[2]
local name, timeout_ms, forget_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local leaving, channel, want, release = ARGV[4] == '1', ARGV[5], ARGV[6], ARGV[7]
-- ARGV[4] = '1': the process is stopping: marked dead now, every lease it
-- holds released. ARGV[5]: the channel to tell the others that leases changed
-- ('' for none). ARGV[6]: the shards the process should own (space-separated):
-- each is claimed when free or held by a process that is dead or forgotten;
-- one held by a live process stays its own (it hands it over by releasing).
-- ARGV[7]: shards it releases (it stopped serving them first).
-- The hash also lists the processes that take leases, as fields '@<name>'.
-- Returns the server's time (ms), the registry (name, deadline, ...) and the
-- owners hash (field, value, ...), both as they are after this beat.

local now_ms = math.floor(aq_now_us() / 1000)
redis.call('ZADD', registry, leaving and now_ms - 1 or now_ms + timeout_ms, name)
redis.call('ZREMRANGEBYSCORE', registry, '-inf', '(' .. aq_int(now_ms - forget_ms))
local listed = redis.call('ZRANGE', registry, 0, -1, 'WITHSCORES')
local deadline = {}
for i = 1, #listed, 2 do deadline[listed[i]] = tonumber(listed[i + 1]) end

local held = {}
local flat = redis.call('HGETALL', owners)
for i = 1, #flat, 2 do held[flat[i]] = flat[i + 1] end

local drop, set = {}, {}
for shard in string.gmatch(release, '%S+') do
  if held[shard] == name then drop[#drop + 1] = shard end
end
if leaving then
  for field, holder in pairs(held) do
    if holder == name then drop[#drop + 1] = field end
  end
  drop[#drop + 1] = '@' .. name
else
  if not held['@' .. name] then set[#set + 1] = '@' .. name; set[#set + 1] = '1' end
  for shard in string.gmatch(want, '%S+') do
    local holder = held[shard]
    if holder ~= name and not (holder and deadline[holder] and deadline[holder] >= now_ms) then
      set[#set + 1] = shard
      set[#set + 1] = name
    end
  end
end
-- A member the registry forgot takes no more leases.
for field in pairs(held) do
  if string.sub(field, 1, 1) == '@' and not deadline[string.sub(field, 2)] then
    drop[#drop + 1] = field
  end
end
for _, field in ipairs(drop) do held[field] = nil end
for i = 1, #set, 2 do held[set[i]] = set[i + 1] end
if #drop > 0 then redis.call('HDEL', owners, unpack(drop)) end
if #set > 0 then redis.call('HSET', owners, unpack(set)) end
if channel ~= '' then
  redis.call('PUBLISH', channel, '!owners')
end

flat = {}
for field, holder in pairs(held) do
  flat[#flat + 1] = field
  flat[#flat + 1] = holder
end
return { aq_int(now_ms), listed, flat }
