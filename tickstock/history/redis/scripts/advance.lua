-- KEYS: a user's delivered pointer   ARGV: event id, ttl s. Only moves forward.
local now = redis.call('GET', KEYS[1])
if not now or idlt(now, ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) end
return 1
