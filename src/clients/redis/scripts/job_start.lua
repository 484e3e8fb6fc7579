-- job_start: creates a background job's record and its runner's lease, and
-- takes the kind's lock unless forced. Trims the kind's index of jobs older
-- than the retention.
-- KEYS[1] the kind's lock (the running job's id)
-- KEYS[2] the job's record
-- KEYS[3] the kind's index (sorted set: id by creation ms)
-- KEYS[4] the job's lease
-- KEYS[5] the kind's set of jobs not finished
-- ARGV    id, record JSON, now (ms), lease (ms), instance id, force ('1' or
--         ''), retention (ms)
-- Returns nil when started, or the id of the job holding the lock.
if ARGV[6] ~= '1' then
  local holder = redis.call('GET', KEYS[1])
  if holder then return holder end
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. string.format('%.0f', tonumber(ARGV[3]) - tonumber(ARGV[7])))
redis.call('SET', KEYS[4], ARGV[5], 'PX', ARGV[4])
redis.call('SADD', KEYS[5], ARGV[1])
return false
