-- Windows remember members (digests) for a while: in two sets, the current
-- bucket, which takes members for SPAN ms or until it holds CAP, then
-- becomes the previous one as the one before it is dropped. So a member is
-- remembered for at least SPAN ms and while fewer than CAP others came
-- after it, and for at most twice both. The hash DEDUPE holds, per window,
-- its buckets' start times 'current previous' (ms; previous 0: none); the
-- bucket started at START is the set DEDUPE:NAME:START, expiring 2 SPAN
-- after START (it takes no member later than START + SPAN).
local DEDUPE, CAP = '@DEDUPE@', @CAP@
local windows = {}
local function bucket(w, start)
  return DEDUPE .. ':' .. w.name .. ':' .. string.format('%.0f', start)
end
local function rotate(w, ms)
  if w.prev > 0 then redis.call('UNLINK', bucket(w, w.prev)) end
  if ms - w.cur < 2 * w.span then w.prev = w.cur else w.prev = 0 end
  w.cur, w.n = math.max(ms, w.cur + 1), 0
  redis.call('HSET', DEDUPE, w.name, string.format('%.0f %.0f', w.cur, w.prev))
end
-- The window NAME at MS, read once per script call.
local function window(name, span, ms)
  local w = windows[name]
  if w == nil then
    w = {name = name, span = span, cur = 0, prev = 0}
    local state = redis.call('HGET', DEDUPE, name)
    if state then
      local cur, prev = string.match(state, '^(%d+) (%d+)$')
      w.cur, w.prev = tonumber(cur), tonumber(prev)
    end
    windows[name] = w
  end
  if ms - w.cur >= span then rotate(w, ms) end
  return w
end
-- Per member, 1 if the window remembers it, else 0.
local function held(w, members)
  local found = redis.call('SMISMEMBER', bucket(w, w.cur), unpack(members))
  if w.prev > 0 then
    local before = redis.call('SMISMEMBER', bucket(w, w.prev), unpack(members))
    for i, v in ipairs(before) do
      if v == 1 then found[i] = 1 end
    end
  end
  return found
end
local function remember(w, members, ms)
  if w.n == nil then w.n = redis.call('SCARD', bucket(w, w.cur)) end
  if w.n >= CAP then rotate(w, ms) end
  local key = bucket(w, w.cur)
  local added = redis.call('SADD', key, unpack(members))
  if w.n == 0 and added > 0 then
    redis.call('PEXPIREAT', key, string.format('%.0f', w.cur + 2 * w.span))
  end
  w.n = w.n + added
end
