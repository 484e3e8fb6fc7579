-- stage_static: accepts immediate (static) changes of one shard. Allocates a
-- version per change from the shard clock (as mark does), keeps each change as
-- pending (`<version>|p|<JSON>`) until the broker confirms it, and drops the
-- users' cached composed profiles.
-- KEYS[1]   the shard's static-pending hash
-- KEYS[2]   the shard's clock
-- KEYS[2+i] the profile-cache key of user i
-- ARGV      user 1, profile JSON 1, user 2, profile JSON 2, ...
-- Returns the versions, in order.
local now = now_us()
local v = tonumber(redis.call('GET', KEYS[2]) or '0')
local out = {}
for i = 1, #ARGV / 2 do
  v = hlc_next(v, now)
  redis.call('HSET', KEYS[1], ARGV[2 * i - 1], fmt(v) .. '|p|' .. ARGV[2 * i])
  redis.call('DEL', KEYS[2 + i])
  out[i] = v
end
redis.call('SET', KEYS[2], fmt(v))
return out
