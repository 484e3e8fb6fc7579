-- legacy_pop: moves up to ARGV[1] members from the legacy set into the popped
-- sorted set in one step, scored by a pop id unique to this call (from the pop
-- clock), so an acknowledgement only removes what its own pop moved. A member
-- popped again by another drainer before the first one acked carries the
-- newer id and survives the first ack. Members are added in chunks: Lua's
-- `unpack` fails past about 8,000 values, and Redis keeps a script's earlier
-- writes when a later command fails.
-- KEYS[1] the legacy set
-- KEYS[2] the popped sorted set
-- KEYS[3] the pop clock (same slot)
-- ARGV    how many to pop
-- Returns {pop id, {members}}; the id is '0' when the set was empty.
local m = redis.call('SPOP', KEYS[1], tonumber(ARGV[1]))
if #m == 0 then return {'0', m} end
local id = fmt(hlc_next(tonumber(redis.call('GET', KEYS[3]) or '0'), now_us()))
redis.call('SET', KEYS[3], id)
for i = 1, #m, 500 do
  local args = {}
  for j = i, math.min(i + 499, #m) do
    args[#args + 1] = id
    args[#args + 1] = m[j]
  end
  redis.call('ZADD', KEYS[2], unpack(args))
end
return {id, m}
