-- legacy_stale: popped members whose drainer never acknowledged them (it died
-- between pop and ack): those popped more than ARGV[1] µs ago by Redis' clock,
-- oldest first. Members of the set-typed draining key of earlier releases are
-- first moved in with pop id 0, so they are recovered too.
-- KEYS[1] the popped sorted set
-- KEYS[2] the earlier releases' draining set
-- ARGV    age in µs, at most how many
-- Returns {member 1, pop id 1, member 2, pop id 2, ...}.
if redis.call('TYPE', KEYS[2]).ok == 'set' then
  local old = redis.call('SPOP', KEYS[2], 500)
  for i = 1, #old do redis.call('ZADD', KEYS[1], 'NX', 0, old[i]) end
end
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', fmt(now_us() - tonumber(ARGV[1])),
  'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
