-- Stores a batch of events, in order, atomically; returns {stored, id} per
-- event (stored 0: a duplicate, with the first copy's id, or '' (a
-- producer event_id the window 'eid:<channel>' remembers); or an
-- event of an unknown or closed job: '!unknown_job', '!finished_job').
-- A stream entry is not acknowledged here: the source does that once what
-- it became is durable. Until then the entry's id is kept in the stream's
-- stored hash, so a redelivery of it is known as the event already stored.
-- A job is a hash {u: owner, f: final status once closed}.
-- KEYS: last id, since key, then per event: topic stream, job key | '',
--       producer stream | ''
-- ARGV: maxlen, max age ms, seen window ms, event_id window ms, user maxlen,
--       user ttl s, user prefix, then per event: channel, type, data,
--       group | '', entry id | '', final status it gives its job | '',
--       producer event_id digest | '', pub/sub message key digest | ''
-- A pub/sub message's key is remembered by the window 'seen', so of the
-- daemons that all receive it, the first one stores it.
-- Sequence numbers step by STRIDE: live ticks take the ids in between.
local STRIDE = @STRIDE@
local STORED = '@STORED@'
local maxlen, max_age = tonumber(ARGV[1]), tonumber(ARGV[2])
local seen_span, eid_span = tonumber(ARGV[3]), tonumber(ARGV[4])
local user_max, user_ttl, user_prefix = tonumber(ARGV[5]), ARGV[6], ARGV[7]
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local seq = 0
local last = redis.call('GET', KEYS[1])
local first = not last
if last then
  local lms, lseq = string.match(last, '^(%d+)-(%d+)$')
  if ms <= tonumber(lms) then ms = tonumber(lms); seq = tonumber(lseq) + STRIDE end
end
local touched, users, out, stored = {}, {}, {}, false
for i = 0, (#KEYS - 2) / 3 - 1 do
  local k, a = 2 + i * 3, 7 + i * 8
  local stream, job_key, source = KEYS[k+1], KEYS[k+2], KEYS[k+3]
  local group, entry, mark = ARGV[a+4], ARGV[a+5], ARGV[a+8]
  local done = nil
  if source ~= '' then
    if #redis.call('XPENDING', source, group, entry, entry, 1) == 0 then
      done = ''
    else
      done = redis.call('HGET', source .. STORED, entry) or nil
    end
  end
  local seen = nil
  if done == nil and mark ~= '' then
    seen = window('seen', seen_span, ms)
    if held(seen, {mark})[1] == 1 then done = '' end
  end
  local eid, eids = ARGV[a+7], nil
  if done == nil and eid ~= '' then
    eids = window('eid:' .. ARGV[a+1], eid_span, ms)
    if held(eids, {eid})[1] == 1 then
      done = ''
      if seen then remember(seen, {mark}, ms) end
    end
  end
  local owner = false
  if done == nil and job_key ~= '' then
    local job = redis.call('HMGET', job_key, 'u', 'f')
    if not job[1] then done = '!unknown_job'
    elseif job[2] then done = '!finished_job'
    else owner = job[1] end
  end
  if done == nil then
    local id = string.format('%.0f-%.0f', ms, seq)
    seq = seq + STRIDE
    local fields = {'c', ARGV[a+1], 't', ARGV[a+2], 'd', ARGV[a+3]}
    if owner then
      fields[7] = 'u'; fields[8] = owner
      if ARGV[a+6] ~= '' then redis.call('HSET', job_key, 'f', ARGV[a+6]) end
      redis.call('EXPIRE', job_key, user_ttl)
    end
    redis.call('XADD', stream, id, unpack(fields))
    touched[stream] = maxlen
    if owner then
      redis.call('XADD', user_prefix .. owner, id, unpack(fields))
      users[user_prefix .. owner] = user_max
    end
    if seen then remember(seen, {mark}, ms) end
    if source ~= '' then redis.call('HSET', source .. STORED, entry, id) end
    if eids then remember(eids, {eid}, ms) end
    last, stored = id, true
    out[#out + 1] = 1
    out[#out + 1] = id
  else
    out[#out + 1] = 0
    out[#out + 1] = done
  end
end
local minid = string.format('%.0f-0', ms - max_age)
local late = string.format('%.0f-0', ms - max_age - 60000)
for stream, n in pairs(touched) do trim(stream, n, minid, late) end
for user, n in pairs(users) do
  trim(user, n, minid, late)
  for _, key in ipairs({user, user .. ':drops', user .. ':dropped'}) do
    redis.call('EXPIRE', key, user_ttl)
  end
end
if stored then
  if first then redis.call('SET', KEYS[2], last) end
  redis.call('SET', KEYS[1], last)
end
return out
