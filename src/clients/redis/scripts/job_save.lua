-- job_save: a running job's checkpoint. Written only by the instance holding
-- the job's lease, which it renews. A lease that expired while its holder
-- was busy between two checkpoints (a slow window) is taken back, when
-- nobody else took it and the stored record is still this instance's and
-- running: expiry alone does not hand a job over, another runner does.
-- KEYS[1] the job's record
-- KEYS[2] the job's lease
-- KEYS[3] the job's cancel mark
-- ARGV    instance id, record JSON, lease (ms)
-- Returns 0 when the lease is another instance's, or the job was taken
-- over or ended meanwhile (nothing written), 1 when saved, 2 when saved
-- and the job was asked to stop.
local holder = redis.call('GET', KEYS[2])
if holder == false then
  local stored = redis.call('GET', KEYS[1])
  if not stored then return 0 end
  local ok, job = pcall(cjson.decode, stored)
  if not ok or job['instance_id'] ~= ARGV[1] or job['state'] ~= 'running' then return 0 end
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
elseif holder ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if redis.call('EXISTS', KEYS[3]) == 1 then return 2 end
return 1
