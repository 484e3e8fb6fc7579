-- clear_flag_ranges: the fast path of clearing a page's flags. Each run is a
-- stretch of the page, consecutive in score order, whose every flag was
-- published; the run's flags still at their versions are exactly the
-- members scored from its lowest to its highest version, so they are removed
-- by score range, with no per-member read, compare or argument. This holds
-- because every score in a dirty set comes from the shard's clock, which only
-- grows: a flag re-marked since the page was read scores above every version
-- of the page (it leaves the run's range and stays), and no new flag can
-- score inside it. Refused, with nothing touched, when the shard has dead
-- letters (the per-member clear closes those a publish earned) or when a
-- range holds more members than its run has flags (a score not from the
-- clock); the caller then clears member by member (clear_flags.lua).
-- Fenced: when ARGV[1] is not empty it must equal the shard's lease value
-- (`token|epoch`), or nothing is touched.
-- KEYS[1] the shard's dirty sorted set
-- KEYS[2] the shard's dead-letter hash
-- KEYS[3] the shard's lease
-- ARGV    fence, then per run: lowest version, highest version, flags in run
-- Returns how many flags were removed, -1 when fenced off, or -2 when the
-- page must be cleared member by member.
if ARGV[1] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[1] then return -1 end
if redis.call('EXISTS', KEYS[2]) == 1 then return -2 end
for i = 2, #ARGV, 3 do
  if redis.call('ZCOUNT', KEYS[1], ARGV[i], ARGV[i + 1]) > tonumber(ARGV[i + 2]) then
    return -2
  end
end
local n = 0
for i = 2, #ARGV, 3 do
  n = n + redis.call('ZREMRANGEBYSCORE', KEYS[1], ARGV[i], ARGV[i + 1])
end
return n
