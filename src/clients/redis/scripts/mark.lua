-- mark: flags users dirty, allocating one version per user from the shard's
-- hybrid logical clock (v = max(now_µs, last + 1), strictly increasing), and
-- drops each user's cached composed profile in the same step.
-- KEYS[1]   the shard's dirty sorted set
-- KEYS[2]   the shard's clock
-- KEYS[2+i] the profile-cache key of user i
-- ARGV      user ids
-- Returns the versions, in ARGV order.
local now = now_us()
local v = tonumber(redis.call('GET', KEYS[2]) or '0')
local out = {}
for i = 1, #ARGV do
  v = hlc_next(v, now)
  redis.call('ZADD', KEYS[1], fmt(v), ARGV[i])
  redis.call('DEL', KEYS[2 + i])
  out[i] = v
end
redis.call('SET', KEYS[2], fmt(v))
return out
