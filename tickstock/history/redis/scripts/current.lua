-- Writes current values (see current.py). KEYS: the hash of values, the
-- sorted set of their keys by update time (ms). ARGV: the most kept, then
-- per value: its key, the value, its time. A value older than the one
-- kept (another node wrote a newer one) is left out; past the most kept,
-- the keys updated longest ago go. Returns how many were written.
local hash, order = KEYS[1], KEYS[2]
local written = 0
for i = 2, #ARGV, 3 do
  local kept = redis.call('ZSCORE', order, ARGV[i])
  if not kept or tonumber(kept) <= tonumber(ARGV[i + 2]) then
    redis.call('HSET', hash, ARGV[i], ARGV[i + 1])
    redis.call('ZADD', order, ARGV[i + 2], ARGV[i])
    written = written + 1
  end
end
local over = redis.call('ZCARD', order) - tonumber(ARGV[1])
while over > 0 do
  local old = redis.call('ZRANGE', order, 0, math.min(over, 1000) - 1)
  redis.call('HDEL', hash, unpack(old))
  redis.call('ZREM', order, unpack(old))
  over = over - #old
end
return written
