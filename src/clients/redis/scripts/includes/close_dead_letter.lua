-- close_dead_letter(h, f, v, earned_at): closes the dead-letter entry in hash
-- `h`, field `f`, when the sync at version `v` earned it: an entry of a stage
-- listed in `earned_at` (a table of stage names, or nil for every stage) at
-- version `v` or older, and an entry of any other stage only if older than
-- `v` (a newer change synced since). A newer entry stays open. An entry that
-- cannot be read is closed.
local function close_dead_letter(h, f, v, earned_at)
  local e = redis.call('HGET', h, f)
  if not e then return end
  local ok, d = pcall(cjson.decode, e)
  if not ok or type(d) ~= 'table' or tonumber(d.version) == nil then
    redis.call('HDEL', h, f)
    return
  end
  local version = tonumber(d.version)
  local own = earned_at == nil or earned_at[d.stage] == true
  if version < v or (own and version == v) then
    redis.call('HDEL', h, f)
  end
end
