-- whitelist_change: adds user ids to the whitelist or removes them, and
-- raises its version when it changed, so every instance reloads it.
-- KEYS[1] the whitelist set; KEYS[2] its version counter
-- ARGV[1] "add" or "remove"; ARGV[2] most entries; ARGV[3..] user ids
-- Returns {changed, size}; {-1, size} when adding would pass the limit
-- (nothing changed).
local n = 0
if ARGV[1] == 'add' then
  local new = 0
  for i = 3, #ARGV do
    if redis.call('SISMEMBER', KEYS[1], ARGV[i]) == 0 then new = new + 1 end
  end
  if redis.call('SCARD', KEYS[1]) + new > tonumber(ARGV[2]) then
    return {-1, redis.call('SCARD', KEYS[1])}
  end
  for i = 3, #ARGV do n = n + redis.call('SADD', KEYS[1], ARGV[i]) end
else
  for i = 3, #ARGV do n = n + redis.call('SREM', KEYS[1], ARGV[i]) end
end
if n > 0 then redis.call('INCR', KEYS[2]) end
return {n, redis.call('SCARD', KEYS[1])}
