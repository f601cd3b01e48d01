-- ARGV: the window's span ms, then the ticks' keys (digests). Per key, 1
-- if this call claimed it first, else 0: the window 'tick' remembers claims.
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local keys = {unpack(ARGV, 2)}
if #keys == 0 then return {} end
local ticks = window('tick', tonumber(ARGV[1]), ms)
local found, out, new, mine = held(ticks, keys), {}, {}, {}
for i, key in ipairs(keys) do
  if found[i] == 1 or mine[key] then
    out[i] = 0
  else
    out[i], mine[key] = 1, true
    new[#new + 1] = key
  end
end
if #new > 0 then remember(ticks, new, ms) end
return out
