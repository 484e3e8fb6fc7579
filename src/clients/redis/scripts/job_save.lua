-- job_save: a running job's checkpoint. Written only by the instance holding
-- the job's lease, which it renews.
-- KEYS[1] the job's record
-- KEYS[2] the job's lease
-- KEYS[3] the job's cancel mark
-- ARGV    instance id, record JSON, lease (ms)
-- Returns 0 when the lease is another instance's (nothing written), 1 when
-- saved, 2 when saved and the job was asked to stop.
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if redis.call('EXISTS', KEYS[3]) == 1 then return 2 end
return 1
