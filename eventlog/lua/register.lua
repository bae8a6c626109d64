-- In a dependency's partition: register a waiting job as its dependent and,
-- when the dependency has already ended, report how it ended. Either the
-- dependency's terminal event comes after this (and finds the dependent in
-- the set), or this sees the terminal state: no dependent is missed. A failed
-- dependency records the dependent even then, so that a retry of it can find
-- the jobs it failed; a completed or cancelled one never runs again, so its
-- set, emptied by the gates once they resolved it, is not made again.
-- Changes no job's state, so it appends no event.
local dep_key, dependents, dep_result = KEYS[1], KEYS[2], KEYS[3]
local dependent_id = ARGV[1]

local cur = redis.call('HMGET', dep_key, 'state', 'result', 'error')
if cur[1] == 'completed' and not cur[2] then
  cur[2] = redis.call('GET', dep_result)  -- a long result, kept apart
end
if not cur[1] then
  return { 'missing' }
end
if cur[1] == 'completed' or cur[1] == 'cancelled' then
  return { 'ended', cur[1], cur[2] or '', cur[3] or '' }
end
redis.call('SADD', dependents, dependent_id)
if cur[1] == 'failed' then
  return { 'ended', cur[1], cur[2] or '', cur[3] or '' }
end
return { 'registered' }
