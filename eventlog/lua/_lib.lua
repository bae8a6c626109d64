-- Prepended to every script when it is loaded. Helpers only: no key is built
-- here and nothing runs on its own.

local function aq_now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Integers as plain digits: tostring() and cjson switch to exponents above 1e14.
local function aq_int(n)
  return string.format('%d', n)
end

local function aq_jstr(s)
  return cjson.encode(s)
end

-- A job's spec: in its own key, or (a job dispatched before specs had their
-- own key) in its record.
local function aq_spec(spec_key, job_key)
  return redis.call('GET', spec_key) or redis.call('HGET', job_key, 'spec')
end

-- A job's result: in its record, or (a long one, see keys.py) in a key of its own.
local function aq_result(job_key, result_key)
  return redis.call('HGET', job_key, 'result') or redis.call('GET', result_key)
end

-- Append one event to the partition log; returns its id, which is the
-- record's new `events` field. `ids` is that field as it was: the id of the
-- job's event before this one, which the new event names in its field `p`.
-- A job's events are so chained in the log, newest to oldest, and an append
-- costs the same however many events the job has (history.lua walks the
-- chain). A record written before kept every event id in `events`: the
-- chain then ends at that list.
local function aq_event(log, job_id, etype, actor, at, data, ids, quiet)
  bell_log = log
  -- Loud: an event some consumer other than the projector acts on (a start,
  -- progress or an ending nobody waits on is not); see aq_ring.
  if not (etype == 'JobStarted' or etype == 'JobProgress'
          or (quiet and etype == 'JobCompleted')) then
    bell_loud = true
  end
  -- `q` is '1' on an ending nobody waits on (no dependent registered, no
  -- announce): a hint to the gates, which then need not look the job up. Every
  -- event has it, '' when not quiet: a stream stores an entry whose field names
  -- are its node's first entry's as values only (81 bytes less per completed
  -- job than when the quiet endings alone had the field).
  return redis.call('XADD', log, '*', 'type', etype, 'jobId', job_id, 'v', '1',
    'at', aq_int(at), 'actor', actor, 'data', data, 'p', ids or '', 'q', quiet and '1' or '')
end

-- Append one event to the partition log and remember its id on the job's record.
local function aq_append(log, job_key, job_id, etype, actor, at, data)
  local id = aq_event(log, job_id, etype, actor, at, data, redis.call('HGET', job_key, 'events'))
  redis.call('HSET', job_key, 'events', id)
  return id
end

local function aq_count(counts, from, to)
  if from then redis.call('HINCRBY', counts, from, -1) end
  if to then redis.call('HINCRBY', counts, to, 1) end
end

-- Attempts left in the current budget (retry starts a new one at budgetFrom).
local function aq_attempts_left(job_key)
  local v = redis.call('HMGET', job_key, 'maxAttempts', 'attempt', 'budgetFrom')
  return tonumber(v[1]) - (tonumber(v[2]) - tonumber(v[3]))
end

-- Exponential backoff for the k-th failed attempt of a budget, with equal
-- jitter: half fixed, half scaled by `spread` (a number in [0, 1) from the caller).
local function aq_backoff_ms(k, base_ms, max_ms, spread)
  local d = base_ms * (2 ^ (k - 1))
  if d > max_ms then d = max_ms end
  return math.floor(d / 2 + d / 2 * spread)
end

-- Release an active job's hold on the partition: its lease and its place in
-- the active set. Returns the worker that held it.
local function aq_release(job_id, leases, active)
  redis.call('ZREM', leases, job_id)
  local hold = redis.call('HGET', active, job_id)
  redis.call('HDEL', active, job_id)
  return hold and string.match(hold, '^%a (.*)$')
end

-- Add a job to the delayed set; the doorbell tells the partition's scheduler
-- the earliest run time the script added (it needs no look of its own).
local function aq_delay(delayed, job_id, run_at)
  local due_ms = math.floor(run_at / 1000)
  redis.call('ZADD', delayed, due_ms, job_id)
  if not bell_due or due_ms < bell_due then bell_due = due_ms end
end

-- Put a job back to run again after a failed or stalled attempt: to `delayed`
-- when there is a backoff, else straight to `queued`. Returns state, runAt.
local function aq_requeue(job_key, job_id, delay_ms, now, delayed, ready)
  if delay_ms > 0 then
    local run_at = now + delay_ms * 1000
    aq_delay(delayed, job_id, run_at)
    redis.call('HSET', job_key, 'state', 'delayed', 'runAt', aq_int(run_at))
    return 'delayed', run_at
  end
  local code = redis.call('HGET', job_key, 'prio')
  redis.call('XADD', ready[code], '*', 'j', job_id)
  redis.call('HSET', job_key, 'state', 'queued', 'queuedAt', aq_int(now))
  return 'queued', nil
end

-- The doorbell, rung once when a script that appended to the partition log
-- ends (script_source wraps such a script so that this runs after it): the
-- agent's id on the channel `<prefix>:ring`, both read off the log's key
-- `<prefix>:{<agent>}:log` (neither may hold a brace). Words follow when the
-- script delayed a job (`d<earliest run time, ms>`) or started leases
-- (`l<their deadline, ms>`), so that whoever serves the partition knows when
-- to look again without asking, and `q` when every event it appended was quiet
-- (aq_event): then only the projector need read (the gates and alerts leave
-- those entries for their next read, or the sweep). PUBLISH needs no key (it
-- is no second partition) and reaches every node of a cluster.
local function aq_ring()
  if not bell_log then return end
  local prefix, agent = string.match(bell_log, '^(.*):{([^}]*)}:log$')
  if not agent then return end
  local word = agent
  if bell_due then word = word .. ' d' .. aq_int(bell_due) end
  if bell_lease then word = word .. ' l' .. aq_int(bell_lease) end
  if not bell_loud then word = word .. ' q' end
  -- After the script's writes: a refused PUBLISH (an ACL without the channel)
  -- must not turn them into an error; the ring is lost, and the sweep finds it.
  redis.pcall('PUBLISH', prefix .. ':ring', word)
end

-- Call `command` on `key` with every item of `items` as an argument, 500 to a
-- call (unpack's limit), not one call per item; with `key` nil the items are
-- the whole arguments (DEL of keys). Returns the integer replies summed.
local function aq_chunked(command, key, items)
  local total = 0
  for at = 1, #items, 500 do
    local last = math.min(at + 499, #items)
    if key then
      total = total + redis.call(command, key, unpack(items, at, last))
    else
      total = total + redis.call(command, unpack(items, at, last))
    end
  end
  return total
end

-- `ended` (keys.py) as the list it is: '<end ms> <job id>' entries in the order
-- they were archived. A deployment made before kept it as a sorted set (job id
-- -> end ms): that is turned into the list, by end, the first time.
local function aq_ended_list(ended)
  if redis.call('TYPE', ended)['ok'] ~= 'zset' then return end
  local old = redis.call('ZRANGE', ended, 0, -1, 'WITHSCORES')
  redis.call('DEL', ended)
  local entries = {}
  for at = 1, #old, 2 do
    entries[#entries + 1] = aq_int(tonumber(old[at + 1])) .. ' ' .. old[at]
  end
  aq_chunked('RPUSH', ended, entries)
end

-- Paged indexes (keys.py, "paged index"; docs/architecture.md): an index
-- `ix` of job ids (all scores 0, in id order) is kept as pages, sorted sets
-- of at most 128 ids (aq_page_cap) that Redis stores as listpacks (about 36
-- bytes an id, against about 120 in one large sorted set), under a directory `ix#`: a
-- sorted set of each page's first possible id (the first page's is ''). The
-- page of `id` is the one with the greatest start not after it, key
-- `ix#p<start>`. Before this, `ix` itself was the whole index: such a key
-- (legacy) is read beside the pages, and moved into them as writers pass.

-- The directory of the paged index `ix`, and its page starting at `start`
-- (keys.py: index_directory, index_page).
local function aq_dir(ix)
  return ix .. '#'
end

local function aq_page(ix, start)
  return ix .. '#p' .. start
end

-- The start of the page after (or before) the one starting at `start`, in the
-- directory `dir`; nil when there is none.
local function aq_page_after(dir, start)
  return redis.call('ZRANGEBYLEX', dir, '(' .. start, '+', 'LIMIT', 0, 1)[1]
end

local function aq_page_before(dir, start)
  if start == '' then return nil end
  return redis.call('ZREVRANGEBYLEX', dir, '(' .. start, '-', 'LIMIT', 0, 1)[1]
end

-- The start of the page that holds, or would hold, `id`.
local function aq_page_start(dir, id)
  return redis.call('ZREVRANGEBYLEX', dir, '[' .. id, '-', 'LIMIT', 0, 1)[1] or ''
end

-- How many ids a page holds, judged by `id`: as many as a listpack of 4,096
-- bytes holds, and 128 at most (zset-max-listpack-entries' default, past which
-- a sorted set leaves its listpack). jemalloc rounds an allocation past 4,096
-- bytes up to 5,120: 128 ids of 31 bytes (35 each in the listpack: a byte of
-- length, the id, a byte back, two for the score 0) take 4,487 bytes and
-- cost 5,120; 116 fill 4,067 of 4,096.
local function aq_page_cap(id)
  local len = #id
  local head = len < 64 and 1 or 2
  local back = head + len < 128 and 1 or 2
  return math.max(16, math.min(128, math.floor((4096 - 7) / (head + len + back + 2))))
end

-- Make room in the full page `page` (start `start`, `size` ids) for `id`: ids
-- appended past the last page's end start a new page (so pages filled in id
-- order stay full); else the page's upper half moves to a new page of its own.
local function aq_page_split(ix, dir, start, page, size, id)
  local later = aq_page_after(dir, start)
  if not later and redis.call('ZLEXCOUNT', page, '[' .. id, '+') == 0 then
    redis.call('ZADD', dir, 0, id)
    return
  end
  local half = math.floor(size / 2)
  local upper = redis.call('ZRANGE', page, half, -1)
  local moved = {}
  for at, member in ipairs(upper) do
    moved[2 * at - 1] = 0
    moved[2 * at] = member
  end
  redis.call('ZADD', aq_page(ix, upper[1]), unpack(moved))
  redis.call('ZREMRANGEBYRANK', page, half, -1)
  redis.call('ZADD', dir, 0, upper[1])
end

-- Add `ids` to the paged index `ix`; returns how many were not in it. Ids
-- from one past the last page's start on belong to that page (or to pages
-- appended after it): as many as it has room for go in with one ZADD. That
-- run is then checked for ids below the page's start (ids not in order; the
-- callers that can sort them do), which move to their own pages.
local function aq_pages_add(ix, ids)
  local dir, added, at = aq_dir(ix), 0, 1
  while at <= #ids do
    local id = ids[at]
    local start = aq_page_start(dir, id)
    local page = aq_page(ix, start)
    local size, cap = redis.call('ZCARD', page), aq_page_cap(id)
    if size >= cap and not redis.call('ZSCORE', page, id) then
      aq_page_split(ix, dir, start, page, size, id)  -- then `id` is looked for again
    else
      if size == 0 then
        redis.call('ZADD', dir, 'NX', 0, start)
      end
      local n = 1
      if not aq_page_after(dir, start) then
        n = math.max(1, math.min(cap - size, #ids - at + 1))
      end
      local members = {}
      for k = 0, n - 1 do
        members[2 * k + 1] = 0
        members[2 * k + 2] = ids[at + k]
      end
      added = added + redis.call('ZADD', page, unpack(members))
      at = at + n
      if n > 1 and start ~= '' then
        local strays = redis.call('ZRANGEBYLEX', page, '-', '(' .. start)
        if #strays > 0 then
          redis.call('ZREM', page, unpack(strays))
          added = added - #strays + aq_pages_add(ix, strays)
        end
      end
    end
  end
  return added
end

-- Take `ids` out of the paged index `ix` (and out of a legacy
-- `ix`); an emptied page leaves the directory, and an emptied directory goes.
-- Returns how many were in it. The page of the id before is tried first: ids
-- in order that are held leave it until it ends, one look at the directory a
-- page, not one an id.
local function aq_pages_rem(ix, ids)
  local dir, removed = aq_dir(ix), 0
  local start, page, size
  for _, id in ipairs(ids) do
    local gone = page and redis.call('ZREM', page, id) or 0
    if gone == 0 then
      start = aq_page_start(dir, id)
      page = aq_page(ix, start)
      size = redis.call('ZCARD', page)
      gone = redis.call('ZREM', page, id)
    end
    if gone == 1 then
      removed, size = removed + 1, size - 1
      if size == 0 then
        if start ~= '' then redis.call('ZREM', dir, start) end
        if redis.call('ZCARD', dir) <= 1 and redis.call('EXISTS', aq_page(ix, '')) == 0 then
          redis.call('DEL', dir)
        end
        page = nil
      end
    end
  end
  if redis.call('EXISTS', ix) == 1 then
    removed = removed + aq_chunked('ZREM', ix, ids)
  end
  return removed
end

-- Move up to `n` ids of a legacy `ix` (one sorted set) into its pages.
local function aq_pages_migrate(ix, n)
  if redis.call('TYPE', ix)['ok'] ~= 'zset' then return end
  local ids = redis.call('ZRANGE', ix, 0, n - 1)
  aq_pages_add(ix, ids)
  aq_chunked('ZREM', ix, ids)
end

-- How many ids the paged index `ix` holds (its pages' and a legacy index's).
local function aq_pages_size(ix)
  local size = redis.call('ZCARD', ix)
  for _, start in ipairs(redis.call('ZRANGE', aq_dir(ix), 0, -1)) do
    size = size + redis.call('ZCARD', aq_page(ix, start))
  end
  return size
end

-- Whether the paged index `ix` holds each of `ids` (a table of booleans). The
-- page that held the id before is asked first (an id is in one page at most):
-- held ids in order cost one look at the directory a page, not one an id.
local function aq_pages_has(ix, ids)
  local dir, held, page = aq_dir(ix), {}, nil
  local legacy = redis.call('EXISTS', ix) == 1
  for at, id in ipairs(ids) do
    local found = page and redis.call('ZSCORE', page, id)
    if not found then
      local its = aq_page(ix, aq_page_start(dir, id))
      found = its ~= page and redis.call('ZSCORE', its, id)
      if found then page = its end
    end
    held[at] = (found or (legacy and redis.call('ZSCORE', ix, id))) and true or false
  end
  return held
end

