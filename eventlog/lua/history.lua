-- Read a job's events back along their chain (each event's field `p` names the
-- job's event before it), newest first, starting at ARGV[1] and reading at
-- most ARGV[2] of them; a long history is read in several calls so that no
-- call holds the server for long. Returns the entries and where to go on
-- ('' once the chain ended). A record written before the chain kept every id
-- in its `events` field: met as a list of ids, it is read whole and ends it.
-- Reads only.
--
-- Finding one entry by id costs a scan of its block of the log (up to 100
-- entries), so the log is read backwards in runs from each event sought: the
-- job's earlier events are often close by, and found in the same run (runs
-- grow while most of a run is the job's, and shrink when little is).
local log = KEYS[1]
local want, left = ARGV[1], tonumber(ARGV[2])
local run_length = 16

local function before(fields)
  for i = 1, #fields, 2 do
    if fields[i] == 'p' then return fields[i + 1] end
  end
  return ''
end

local out = {}
while want ~= '' and left > 0 and not string.find(want, ' ', 1, true) do
  local run = redis.call('XREVRANGE', log, want, '-', 'COUNT', math.min(run_length, left))
  if not run[1] or run[1][1] ~= want then
    want = ''  -- no longer in the log
    break
  end
  local found = 0
  for _, entry in ipairs(run) do
    if entry[1] == want then
      out[#out + 1] = entry
      found = found + 1
      left = left - 1
      want = before(entry[2])
      if want == '' or left == 0 or string.find(want, ' ', 1, true) then break end
    end
  end
  -- Longer runs while the job's events lie close together, shorter when not.
  if found * 2 > #run then
    run_length = math.min(run_length * 2, 1024)
  elseif run_length > 16 then
    run_length = run_length / 2
  end
end
if string.find(want, ' ', 1, true) then
  local ids = {}
  for id in string.gmatch(want, '%S+') do
    ids[#ids + 1] = id
  end
  for i = #ids, 1, -1 do
    local entry = redis.call('XRANGE', log, ids[i], ids[i])[1]
    if entry then out[#out + 1] = entry end
  end
  want = ''
end
return { out, want }
