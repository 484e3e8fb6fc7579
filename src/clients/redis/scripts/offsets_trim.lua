-- offsets_trim: deletes the oldest ranges of one topic partition whose last
-- record is older than the cutoff, at most ARGV[2] of them, so one call never
-- blocks Redis for long; the caller calls again while a batch comes back full.
-- Ranges are walked in offset order and the walk stops at the first one
-- still inside the retention.
-- KEYS[1] the partition's sorted set
-- KEYS[2] the set of partitions that have ranges
-- ARGV[1] cutoff (Unix ms); ARGV[2] most ranges to delete; ARGV[3] "<topic>:<partition>"
-- Returns {deleted, more}: more = 1 when the batch was full.
local cutoff, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local deleted = 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, n - 1)) do
  local last = tonumber(string.match(m, ':(%-?%d+)$'))
  if last == nil or last >= cutoff then break end
  redis.call('ZREM', KEYS[1], m)
  deleted = deleted + 1
end
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[3]) end
if deleted == n then return {deleted, 1} end
return {deleted, 0}
