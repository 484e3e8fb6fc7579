-- close_dead_letter(h, f, v): closes the dead-letter entry in hash `h`, field
-- `f`, if it is for version `v` or older (its JSON's `version`); a newer entry
-- stays open. An entry that cannot be read is closed.
local function close_dead_letter(h, f, v)
  local e = redis.call('HGET', h, f)
  if not e then return end
  local ok, d = pcall(cjson.decode, e)
  if not ok or type(d) ~= 'table' or tonumber(d.version) == nil or tonumber(d.version) <= v then
    redis.call('HDEL', h, f)
  end
end
