-- job_finish: a job's last record, kept for the retention; its lease goes,
-- and the kind's lock if this job holds it.
-- KEYS[1] the job's record
-- KEYS[2] the job's lease
-- KEYS[3] the kind's lock
-- KEYS[4] the kind's set of jobs not finished
-- ARGV    instance id, record JSON, retention (ms), job id
-- Returns 0 when the lease is another instance's (nothing written), else 1.
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[2])
if redis.call('GET', KEYS[3]) == ARGV[4] then redis.call('DEL', KEYS[3]) end
redis.call('SREM', KEYS[4], ARGV[4])
return 1
