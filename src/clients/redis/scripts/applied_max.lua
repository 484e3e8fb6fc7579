-- applied_max: raises applied versions in the L2 cache, never lowers them.
-- KEYS[1] the shard's applied-version hash
-- ARGV    field 1 (`<user>|s` or `<user>|d`), version 1, field 2, version 2, ...
-- Returns 1.
-- One HMGET and at most one HSET per chunk of fields, not one of each per
-- field. A field named twice in a chunk is compared with what the hash held
-- before the chunk, and the higher of its versions is written.
local chunk = 1000 -- fields per call, well below Lua's limit on unpack()
for from = 1, #ARGV, 2 * chunk do
  local fields = {}
  for i = from, math.min(from + 2 * chunk - 1, #ARGV), 2 do
    fields[#fields + 1] = ARGV[i]
  end
  local current = redis.call('HMGET', KEYS[1], unpack(fields))
  -- field -> index in ARGV of its highest version above the stored one
  local raised, order = {}, {}
  for j = 1, #fields do
    local f, at = fields[j], from + 2 * j - 1
    local best = raised[f] and tonumber(ARGV[raised[f]]) or tonumber(current[j] or '0') or 0
    if tonumber(ARGV[at]) > best then
      if raised[f] == nil then order[#order + 1] = f end
      raised[f] = at
    end
  end
  if #order > 0 then
    local updates = {}
    for _, f in ipairs(order) do
      updates[#updates + 1] = f
      updates[#updates + 1] = ARGV[raised[f]]
    end
    redis.call('HSET', KEYS[1], unpack(updates))
  end
end
return 1
