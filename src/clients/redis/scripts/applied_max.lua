-- applied_max: raises applied versions in the L2 cache, never lowers them.
-- KEYS[1] the shard's applied-version hash
-- ARGV    field 1 (`<user>|s` or `<user>|d`), version 1, field 2, version 2, ...
-- Returns 1.
for i = 1, #ARGV, 2 do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if tonumber(ARGV[i + 1]) > cur then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
