-- delete: records users as deleted, allocating one version per user from the
-- shard's hybrid logical clock, flags them with that version (so the scanner
-- publishes the delete) and drops each user's cached composed profile.
-- KEYS[1]   the shard's dirty sorted set
-- KEYS[2]   the shard's deleted hash (user -> delete version)
-- KEYS[3]   the shard's clock
-- KEYS[3+i] the profile-cache key of user i
-- ARGV      user ids
-- Returns the versions, in ARGV order.
local now = now_us()
local v = tonumber(redis.call('GET', KEYS[3]) or '0')
local out = {}
for i = 1, #ARGV do
  v = hlc_next(v, now)
  redis.call('ZADD', KEYS[1], fmt(v), ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i], fmt(v))
  redis.call('DEL', KEYS[3 + i])
  out[i] = v
end
redis.call('SET', KEYS[3], fmt(v))
return out
