-- In a parent job's partition: a child was dispatched from inside it (its
-- parentJobId). Either the parent was cancelled with cascade (its mark is
-- set, by the same cancel.lua call that cancelled it): the caller cancels the
-- child; or the child joins the parent's children, where a later cascading
-- cancel finds it (it reads the set after its cancel set the mark). So a child
-- dispatched while its parent is being cancelled is never left running.
-- Changes no job's state, so it appends no event.
local parent_key, children, cascaded = KEYS[1], KEYS[2], KEYS[3]
local child_id = ARGV[1]

if redis.call('EXISTS', cascaded) == 1 then
  return { 'cancel' }
end
if redis.call('EXISTS', parent_key) == 0 then
  return { 'missing' }
end
redis.call('SADD', children, child_id)
return { 'added' }
