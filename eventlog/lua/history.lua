-- Read a job's events back along their chain (each event's field `p` names the
-- job's event before it), newest first, starting at ARGV[1] and reading at
-- most ARGV[2] of them; a long history is read in several calls so that no
-- call holds the server for long. Returns the entries and where to go on
-- ('' once the chain ended). A record written before the chain kept every id
-- in its `events` field: met as a list of ids, it is read whole and ends it.
-- Reads only.
--
-- An entry is returned flat, as three values: its id, how many names and
-- values it has, and those joined by the byte 0x1f, in the order aq_event
-- writes them (type jobId v at actor data p, then q when set; an entry
-- written otherwise is put in that order). A reply of 10,000 entries so
-- holds 30,000 values instead of 180,000, and the client splits each text
-- once and finds each value at its place; the count tells it when a value
-- held the byte itself (JSON text never does), and it reads that entry again
-- by itself.
--
-- Finding one entry by id costs a scan of its block of the log (up to 100
-- entries), so the log is read backwards in runs from each event sought: the
-- job's earlier events are often close by, and found in the same run (runs
-- grow while most of a run is the job's, and shrink when little is). ARGV[3],
-- when given, caps a run's length: 1 reads each event alone, for a reader
-- that walks many jobs whose events lie far apart (audit verify).
--
-- ARGV[4..], when given, are more jobs' starts, each chain walked in the same
-- way (up to ARGV[2] events each): the reply is then the entries and where to
-- go on of each start in turn, flat. One call for many jobs costs the caller
-- one command, not one per job.
local log = KEYS[1]
local run_cap = tonumber(ARGV[3]) or 1024
local out, n

-- The entry's names and values in aq_event's order.
local function in_order(fields)
  if fields[1] == 'type' and fields[3] == 'jobId' and fields[5] == 'v' and fields[7] == 'at'
      and fields[9] == 'actor' and fields[11] == 'data' and fields[13] == 'p'
      and (#fields == 14 or (#fields == 16 and fields[15] == 'q')) then
    return fields
  end
  local f = {}
  for i = 1, #fields, 2 do f[fields[i]] = fields[i + 1] end
  local ordered = { 'type', f.type or '', 'jobId', f.jobId or '', 'v', f.v or '', 'at', f.at or '',
    'actor', f.actor or '', 'data', f.data or '', 'p', f.p or '' }
  if f.q then
    ordered[15], ordered[16] = 'q', f.q
  end
  return ordered
end

-- Add the entry to the reply; returns the id of the job's event before it.
local function put(id, fields)
  fields = in_order(fields)
  out[n + 1] = id
  out[n + 2] = #fields
  out[n + 3] = table.concat(fields, '\31')
  n = n + 3
  return fields[14]
end

-- Walk one chain from `want`, at most `left` events, onto `out`; returns where
-- to go on.
local function walk(want, left)
  local run_length = math.min(16, run_cap)
  while want ~= '' and left > 0 and not string.find(want, ' ', 1, true) do
    local run = redis.call('XREVRANGE', log, want, '-', 'COUNT', math.min(run_length, left))
    if not run[1] or run[1][1] ~= want then
      want = ''  -- no longer in the log
      break
    end
    local found = 0
    for _, entry in ipairs(run) do
      if entry[1] == want then
        found = found + 1
        left = left - 1
        want = put(want, entry[2])
        if want == '' or left == 0 or string.find(want, ' ', 1, true) then break end
      end
    end
    -- Longer runs while the job's events lie close together, shorter when not.
    if found * 2 > #run then
      run_length = math.min(run_length * 2, run_cap)
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
      if entry then put(entry[1], entry[2]) end
    end
    want = ''
  end
  return want
end

local reply = {}
for i, start in ipairs(ARGV) do
  if i == 1 or i > 3 then
    out, n = {}, 0
    local after = walk(start, tonumber(ARGV[2]))
    reply[#reply + 1] = out
    reply[#reply + 1] = after
  end
end
return reply
