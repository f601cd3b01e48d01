-- KEYS: stream, since key, delivered pointer | ''   ARGV: after | ''
local after = ARGV[1]
if after == '' then after = redis.call('GET', KEYS[3]) or '0-0' end
local since = redis.call('GET', KEYS[2]) or ''
local entries = redis.call('XRANGE', KEYS[1], '(' .. after, '+')
local newest = redis.call('XREVRANGE', KEYS[1] .. ':drops', '+', '-', 'COUNT', 1)
local last_dropped, dropped = '0-0', 0
if #newest > 0 then last_dropped, dropped = newest[1][1], tonumber(newest[1][2][2]) end
local mark = redis.call('XREVRANGE', KEYS[1] .. ':drops', after, '-', 'COUNT', 1)
local through = 0
if #mark > 0 then through = tonumber(mark[1][2][2]) end
return {after, entries, last_dropped, dropped, through, since}
