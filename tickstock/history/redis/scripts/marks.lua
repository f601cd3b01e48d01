-- KEYS: drop-mark streams   ARGV: per key, the id a tail read starts after.
-- Per key, the newest drop mark after that id, or ''.
local out = {}
for i, key in ipairs(KEYS) do
  local mark = redis.call('XREVRANGE', key, '+', '(' .. ARGV[i], 'COUNT', 1)
  out[i] = mark[1] and mark[1][1] or ''
end
return out
