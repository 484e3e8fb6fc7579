-- lease_release: compare-and-delete of a lease; only the holder releases it.
-- KEYS[1] the shard's lease
-- ARGV    the held value (`token|epoch`)
-- Returns 1 if released.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
