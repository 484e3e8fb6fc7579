-- mark: flags users dirty, allocating one version per user from the shard's
-- hybrid logical clock (v = max(now_µs, last + 1), strictly increasing), and
-- drops each user's cached composed profile in the same step.
-- KEYS[1]   the shard's dirty sorted set
-- KEYS[2]   the shard's clock
-- KEYS[2+i] the profile-cache key of user i
-- ARGV      user ids
-- Returns the versions, in ARGV order.
-- One ZADD and one DEL per chunk of users, not one of each per user: on a
-- batch of hundreds, the calls themselves were most of the script's cost. A
-- user named twice gets both versions, the later one kept, as one call per
-- user did.
local now = now_us()
local v = tonumber(redis.call('GET', KEYS[2]) or '0')
local out = {}
local chunk = 1000 -- users per call, well below Lua's limit on unpack()
for from = 1, #ARGV, chunk do
  local flags, caches = {}, {}
  for i = from, math.min(from + chunk - 1, #ARGV) do
    v = hlc_next(v, now)
    out[i] = v
    flags[#flags + 1] = fmt(v)
    flags[#flags + 1] = ARGV[i]
    caches[#caches + 1] = KEYS[2 + i]
  end
  redis.call('ZADD', KEYS[1], unpack(flags))
  redis.call('DEL', unpack(caches))
end
redis.call('SET', KEYS[2], fmt(v))
return out
