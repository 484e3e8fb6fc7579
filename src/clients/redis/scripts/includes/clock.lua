-- Hybrid logical clock helpers (versions, epochs, pop ids).
-- now_us(): Redis' own time in microseconds.
-- hlc_next(last, now): the next value after `last`, at least `now`, so values
-- grow with time and stay strictly increasing when the clock steps back.
-- fmt(v): a clock value as an integer string (Lua numbers are doubles; values
-- in µs stay exact below 2^53).
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function hlc_next(last, now)
  local v = last + 1
  if now > v then v = now end
  return v
end

local function fmt(v)
  return string.format('%.0f', v)
end
