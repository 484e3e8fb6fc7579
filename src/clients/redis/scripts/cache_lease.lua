-- cache_lease: reads a profile-cache entry, placing the caller's placeholder
-- first if the entry is absent (the start of a placeholder-guarded fill).
-- KEYS[1] the cache key
-- ARGV    placeholder, placeholder ttl in ms
-- Returns the entry's value: the cached profile, or a placeholder (the
-- caller's own, or another reader's fill in progress).
redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
return redis.call('GET', KEYS[1])
