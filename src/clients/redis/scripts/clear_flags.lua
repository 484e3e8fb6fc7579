-- clear_flags: compare-and-delete of a shard's flags. Removes a flag only if
-- its score is still the version that was published, and then closes the
-- user's dynamic dead letter if it is for that version or an older one (the
-- user synced). A flag whose score moved on, and every static dead letter,
-- are left alone.
-- Fenced: when ARGV[1] is not empty it must equal the shard's lease value
-- (`token|epoch`), or nothing is touched.
-- KEYS[1] the shard's dirty sorted set
-- KEYS[2] the shard's dead-letter hash
-- KEYS[3] the shard's lease
-- ARGV    fence, user 1, version 1, user 2, version 2, ...
-- Returns how many flags were removed, or -1 when fenced off.
if ARGV[1] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[1] then return -1 end
local n = 0
local dlq = redis.call('EXISTS', KEYS[2]) == 1
for i = 2, #ARGV, 2 do
  local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if s and tonumber(s) == tonumber(ARGV[i + 1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
    n = n + 1
    if dlq then close_dead_letter(KEYS[2], ARGV[i] .. '|d', tonumber(ARGV[i + 1])) end
  end
end
return n
