-- active -> completed for a batch of finished attempts. The attempt number is
-- the fencing token: a finish for any attempt but the current one is refused.
local counts, log, leases, active = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local actor, n = ARGV[1], tonumber(ARGV[2])
-- Per job i: KEYS[9 + i] its record; ARGV[3 + 3(i-1)] job id, attempt, result
-- JSON. Then the prefixes of the partition's dependents sets and specs
-- (ARGV[3 + 3n], +1), and the SHA-256 of each long result as pairs `i sha`
-- (ARGV[5 + 3n], "" when every result is short: most batches): the record keeps
-- the result, and the JobCompleted event carries the digest in its place (Lua
-- has no SHA-256: the caller computes it). Such a long result is kept in a key
-- of its own (ARGV[6 + 3n] .. id), not in the record, which says so with the
-- field `longResult` (keys.py's result; records.with_kept_apart).
local dependents_prefix, spec_prefix = ARGV[3 + 3 * n], ARGV[4 + 3 * n]
local result_prefix = ARGV[6 + 3 * n]
local digests = {}
for i, sha in string.gmatch(ARGV[5 + 3 * n], '(%d+) (%x+)') do
  digests[tonumber(i)] = sha
end

local now
local reply = {}
local done = 0
for i = 1, n do
  local job_key, a = KEYS[9 + i], 3 + 3 * (i - 1)
  local job_id, attempt, result = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local sha = digests[i] or ''
  local cur = redis.call('HMGET', job_key, 'state', 'attempt', 'events')
  if cur[1] ~= 'active' or cur[2] ~= attempt then
    reply[i] = { 'invalid_state', cur[1] or 'missing', cur[2] or '0' }
  else
    now = now or aq_now_us()
    local spec = aq_spec(spec_prefix .. job_id, job_key) or ''
    local quiet = redis.call('EXISTS', dependents_prefix .. job_id) == 0
      and not string.find(spec, '"announce":true', 1, true)
    local logged = sha == '' and ',"result":' .. result or ',"resultSha256":"' .. sha .. '"'
    local events = aq_event(log, job_id, 'JobCompleted', actor, now,
      '{"attempt":' .. attempt .. logged .. '}', cur[3], quiet)
    if sha == '' then
      redis.call('HSET', job_key, 'state', 'completed', 'result', result,
        'finishedAt', aq_int(now), 'events', events)
      redis.call('HDEL', job_key, 'error')
    else
      redis.call('SET', result_prefix .. job_id, result)
      redis.call('HSET', job_key, 'state', 'completed', 'finishedAt', aq_int(now),
        'events', events, 'longResult', '1')
      redis.call('HDEL', job_key, 'error', 'result')
    end
    redis.call('ZREM', leases, job_id)
    redis.call('HDEL', active, job_id)
    done = done + 1
    reply[i] = { 'ok' }
  end
end
if done > 0 then
  redis.call('HINCRBY', counts, 'active', -done)
  redis.call('HINCRBY', counts, 'completed', done)
end
return reply
