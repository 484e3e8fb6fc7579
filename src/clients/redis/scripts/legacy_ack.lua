-- legacy_ack: acknowledges popped members once they are flagged. Removes each
-- only if its score is still the pop id it was moved with (compare-and-delete).
-- KEYS[1] the popped sorted set
-- ARGV    member 1, pop id 1, member 2, pop id 2, ...
-- Returns how many were removed.
local n = 0
for i = 1, #ARGV, 2 do
  local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if s and tonumber(s) == tonumber(ARGV[i + 1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
