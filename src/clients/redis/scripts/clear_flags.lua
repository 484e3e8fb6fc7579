-- clear_flags: compare-and-delete of a shard's flags. Removes a flag only if
-- its score is still the version that was published, and then closes the
-- user's dynamic dead letter if that publish earned it: a load or publish
-- failure at that version or older, or any dead letter of an older version.
-- A MongoDB rejection at the very version just published stays open (the
-- applier may have rejected it already: publishing proves nothing about
-- applying). The one-field-per-user entries of earlier releases are closed
-- the same way. A flag whose score moved on, and every static dead letter,
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
local scanner_stages = { load = true, publish = true }
for i = 2, #ARGV, 2 do
  local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if s and tonumber(s) == tonumber(ARGV[i + 1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
    n = n + 1
    if dlq then
      local v = tonumber(ARGV[i + 1])
      close_dead_letter(KEYS[2], ARGV[i] .. '|d', v, scanner_stages)
      close_dead_letter(KEYS[2], ARGV[i], v, scanner_stages)
    end
  end
end
return n
