-- lease_acquire: takes a free lease. Allocates the shard's next epoch and
-- stores `token|epoch` with a TTL. The epoch is a hybrid logical clock, not a
-- bare counter: if a Redis failover loses the last acquisition (replication
-- is asynchronous), the next owner still gets an epoch above every one handed
-- out before, as long as the new primary's clock is not behind by more than
-- the failover took.
-- KEYS[1] the shard's lease
-- KEYS[2] the shard's epoch
-- ARGV    token, ttl in ms
-- Returns the epoch, or 0 if the lease is held.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local e = fmt(hlc_next(tonumber(redis.call('GET', KEYS[2]) or '0'), now_us()))
redis.call('SET', KEYS[2], e)
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. e, 'PX', ARGV[2])
return tonumber(e)
