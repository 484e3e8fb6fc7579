-- job_unlock: releases a kind's lock if it is still held by the given job
-- (one that finished without releasing it, or whose record is gone).
-- KEYS[1] the kind's lock
-- ARGV    job id
-- Returns 1 when released, else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
