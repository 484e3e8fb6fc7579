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
-- The scores are read with one ZMSCORE and the flags removed with one ZREM
-- per chunk of users, not two calls per user: on a page of thousands of
-- flags, the calls themselves were most of the script's cost.
local n = 0
local dlq = redis.call('EXISTS', KEYS[2]) == 1
local scanner_stages = { load = true, publish = true }
local chunk = 1000 -- users per call, well below Lua's limit on unpack()
for from = 2, #ARGV, 2 * chunk do
  local users, versions = {}, {}
  for i = from, math.min(from + 2 * chunk - 1, #ARGV), 2 do
    users[#users + 1] = ARGV[i]
    versions[#versions + 1] = tonumber(ARGV[i + 1])
  end
  local scores = redis.call('ZMSCORE', KEYS[1], unpack(users))
  local gone = {}
  for j = 1, #users do
    local s = scores[j]
    if s and tonumber(s) == versions[j] then
      gone[#gone + 1] = users[j]
      if dlq then
        close_dead_letter(KEYS[2], users[j] .. '|d', versions[j], scanner_stages)
        close_dead_letter(KEYS[2], users[j], versions[j], scanner_stages)
      end
    end
  end
  if #gone > 0 then
    redis.call('ZREM', KEYS[1], unpack(gone))
    n = n + #gone
  end
end
return n
