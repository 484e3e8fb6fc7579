-- offsets_add: records applied offset ranges of one topic partition. A range
-- that overlaps stored ones (a window applied again after a restart whose
-- commit was lost) is merged with them, so stored ranges never overlap.
-- Adjacent ranges stay apart: each covers at most one flush interval, which
-- keeps the index's time resolution.
-- KEYS[1] the partition's sorted set (score = start offset)
-- KEYS[2] the set of partitions that have ranges
-- ARGV[1] "<topic>:<partition>"; then 4 integers per range: start, end
--         (inclusive), first record time, last record time (Unix ms)
-- Returns the number of ranges given.
local function parse(m)
  local s, e, f, l = string.match(m, '^(%-?%d+):(%-?%d+):(%-?%d+):(%-?%d+)$')
  return tonumber(s), tonumber(e), tonumber(f), tonumber(l)
end
for i = 2, #ARGV, 4 do
  local s, e = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  local f, l = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local over = {}
  -- The stored range that starts before this one and reaches into it.
  local prev = redis.call('ZREVRANGEBYSCORE', KEYS[1], string.format('(%d', s), '-inf', 'LIMIT', 0, 1)
  if prev[1] then
    local _, pe = parse(prev[1])
    if pe and pe >= s then table.insert(over, prev[1]) end
  end
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], string.format('%d', s), string.format('%d', e))) do
    table.insert(over, m)
  end
  for _, m in ipairs(over) do
    local ms, me, mf, ml = parse(m)
    if ms then
      s = math.min(s, ms); e = math.max(e, me); f = math.min(f, mf); l = math.max(l, ml)
    end
    redis.call('ZREM', KEYS[1], m)
  end
  redis.call('ZADD', KEYS[1], string.format('%d', s), string.format('%d:%d:%d:%d', s, e, f, l))
end
redis.call('SADD', KEYS[2], ARGV[1])
return (#ARGV - 1) / 4
