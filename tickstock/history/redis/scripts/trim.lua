-- Trim KEY to MAXLEN entries and entries newer than MINID, in batches of
-- about @BATCH@, recording each batch (newest dropped id, total dropped) in
-- KEY:drops: XTRIM does not update max-deleted-entry-id, so Redis cannot say
-- what it dropped.
local function trim(key, maxlen, minid, late)
  local cut = nil
  local len = redis.call('XLEN', key)
  if len > maxlen + @BATCH@ then
    local gone = redis.call('XRANGE', key, '-', '+', 'COUNT', len - maxlen)
    cut = gone[#gone][1]
  end
  local old = redis.call('XRANGE', key, '-', '(' .. minid, 'COUNT', @BATCH@)
  if #old == @BATCH@ or (#old > 0 and idlt(old[1][1], late)) then
    if cut == nil or idlt(cut, old[#old][1]) then cut = old[#old][1] end
  end
  if cut == nil then return end
  local ms, seq = string.match(cut, '^(%d+)-(%d+)$')
  local dropped = redis.call('XTRIM', key, 'MINID', ms .. '-' .. string.format('%.0f', tonumber(seq) + 1))
  local total = redis.call('INCRBY', key .. ':dropped', dropped)
  redis.call('XADD', key .. ':drops', 'MAXLEN', '~', @KEPT@, cut, 'n', total)
end
