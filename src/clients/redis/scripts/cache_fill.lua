-- cache_fill: fills a profile-cache entry only if the fill's placeholder is
-- still there. Any invalidation in between (a mark, an immediate change, an
-- applied write) deleted it, and the possibly stale value is dropped.
-- KEYS[1] the cache key
-- ARGV    placeholder, value, ttl in ms
-- Returns 1 if filled, 0 if dropped.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
