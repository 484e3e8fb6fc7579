-- static_acked: marks pending immediate changes as acknowledged by the broker
-- (state `p` or `r` becomes `a`) if still at the published version. The scanner
-- no longer republishes them; profile reads keep overlaying them until MongoDB
-- has them.
-- KEYS[1] the shard's static-pending hash
-- ARGV    user 1, version 1, user 2, version 2, ...
-- Returns how many were marked.
local n = 0
for i = 1, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  local v, state, json = string.match(cur or '', '^(%d+)|(%a)|(.*)$')
  if v == ARGV[i + 1] and (state == 'p' or state == 'r') then
    redis.call('HSET', KEYS[1], ARGV[i], v .. '|a|' .. json)
    n = n + 1
  end
end
return n
