-- lease_renew: extends a lease only if the caller still holds it.
-- KEYS[1] the shard's lease
-- ARGV    the held value (`token|epoch`), ttl in ms
-- Returns 1 if renewed, 0 if it is no longer the caller's.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
