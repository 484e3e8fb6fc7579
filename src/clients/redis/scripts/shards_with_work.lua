-- shards_with_work: how much each shard holds for the scan, so an idle cycle
-- asks once instead of reading every shard's flags and pending immediate
-- changes in turn. On a single Redis the keys of every shard go in one call;
-- on a Redis Cluster each shard is a call of its own (its keys share a slot).
-- KEYS  per shard, in order: its dirty sorted set, then its hash of pending
--       immediate changes
-- Returns one count per shard: its flags plus its pending immediate changes.
local counts = {}
for i = 1, #KEYS, 2 do
  counts[#counts + 1] = redis.call('ZCARD', KEYS[i]) + redis.call('HLEN', KEYS[i + 1])
end
return counts
