-- delete: records users as deleted, allocating one version per user from the
-- shard's hybrid logical clock, flags them with that version (so the scanner
-- publishes the delete), drops each user's cached composed profile and, on a
-- single Redis, the user's profile key, so the delete is whole or nothing.
-- KEYS[1]   the shard's dirty sorted set
-- KEYS[2]   the shard's deleted hash (user -> delete version)
-- KEYS[3]   the shard's clock
-- KEYS[3+i] the profile-cache key of user i
-- ARGV      pairs: user id, then its profile key, or '' on a Redis Cluster
--           (the key lies in another slot there; the caller removed it first).
--           Not in KEYS, because on a single Redis any key may be touched.
-- Returns the versions, in user order.
local now = now_us()
local v = tonumber(redis.call('GET', KEYS[3]) or '0')
local out = {}
for i = 1, #ARGV / 2 do
  local user, profile = ARGV[2 * i - 1], ARGV[2 * i]
  v = hlc_next(v, now)
  redis.call('ZADD', KEYS[1], fmt(v), user)
  redis.call('HSET', KEYS[2], user, fmt(v))
  redis.call('DEL', KEYS[3 + i])
  if profile ~= '' then redis.call('DEL', profile) end
  out[i] = v
end
redis.call('SET', KEYS[3], fmt(v))
return out
