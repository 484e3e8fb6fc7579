-- restage_static: puts rejected (or never acknowledged) immediate changes back
-- in line for publishing, for a DLQ redrive. Each user's pending change gets a
-- new version from the shard clock and the state `r`, which the scanner
-- publishes at its next pass; the user's cached profile is dropped.
-- KEYS[1]   the shard's static-pending hash
-- KEYS[2]   the shard's clock
-- KEYS[2+i] the profile-cache key of user i
-- ARGV      user ids
-- Returns the new versions, in order; 0 where nothing was pending.
local now = now_us()
local v = tonumber(redis.call('GET', KEYS[2]) or '0')
local out = {}
for i = 1, #ARGV do
  out[i] = 0
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  local json = cur and string.match(cur, '^%d+|%a|(.*)$')
  if json then
    v = hlc_next(v, now)
    redis.call('HSET', KEYS[1], ARGV[i], fmt(v) .. '|r|' .. json)
    redis.call('DEL', KEYS[2 + i])
    out[i] = v
  end
end
redis.call('SET', KEYS[2], fmt(v))
return out
