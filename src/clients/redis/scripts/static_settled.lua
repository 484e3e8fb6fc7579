-- static_settled: drops pending immediate changes once MongoDB has settled them
-- (applied, or superseded by a newer stored version): entries at or below the
-- settled version. Closes the users' static dead letters up to that version.
-- A change MongoDB rejected is not settled: it stays pending for a redrive.
-- KEYS[1] the shard's static-pending hash
-- KEYS[2] the shard's dead-letter hash
-- ARGV    user 1, version 1, user 2, version 2, ...
-- Returns how many pending entries were dropped.
local n = 0
for i = 1, #ARGV, 2 do
  local v = tonumber(ARGV[i + 1])
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if cur then
    local pv = tonumber(string.match(cur, '^(%d+)|'))
    if pv and pv <= v then
      redis.call('HDEL', KEYS[1], ARGV[i])
      n = n + 1
    end
  end
  close_dead_letter(KEYS[2], ARGV[i] .. '|s', v, nil)
end
return n
