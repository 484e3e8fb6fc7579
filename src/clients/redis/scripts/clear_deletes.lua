-- clear_deletes: compare-and-delete of a shard's recorded deletes once their
-- events are on the broker. Removes a user's entry only if it still holds the
-- version that was published (a newer delete of the same user stays).
-- Fenced like clear_flags: when ARGV[1] is not empty it must equal the shard's
-- lease value, or nothing is touched.
-- KEYS[1] the shard's deleted hash
-- KEYS[2] the shard's lease
-- ARGV    fence, user 1, version 1, user 2, version 2, ...
-- Returns how many entries were removed, or -1 when fenced off.
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
local n = 0
for i = 2, #ARGV, 2 do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v and tonumber(v) == tonumber(ARGV[i + 1]) then
    redis.call('HDEL', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
