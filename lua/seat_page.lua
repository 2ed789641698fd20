--[[
  seat_page: one page of a seated zone's seat map, in catalog order, after reaping expired holds.

  KEYS[1]  {evt:E}:meta
  ARGV[1]  zone_id            string
  ARGV[2]  status             "" (any) | "available" | "held" | "sold"
  ARGV[3]  after              seat label to start after, "" = from the first seat
  ARGV[4]  limit              integer, most seats returned
  ARGV[5]  scan_limit         integer, most seats examined in one call (bounds the script's run time)
  ARGV[6]  retention_seconds  integer
  ARGV[7]  reap_limit         integer

  Returns JSON: {"seats": [{seat, status}], "next": label|null} where next is the `after` of the following
  page (null at the end), or {"err": code, "details": {}} with code in event_not_found, zone_not_found,
  invalid_item {zone_id, reason} (not a seated zone), unknown_seats {zone_id, seats} (unknown `after`).
]]
--- @include common

local meta_key = KEYS[1]
local prefix = prefix_of(meta_key)
local zone_id, want, after = ARGV[1], ARGV[2], ARGV[3]
local limit, scan_limit = tonumber(ARGV[4]), tonumber(ARGV[5])

if redis.call('EXISTS', meta_key) == 0 then return fail('event_not_found') end
local kind = redis.call('HGET', prefix .. 'zone:' .. zone_id, 'kind')
if not kind then return fail('zone_not_found', { zone_id = zone_id }) end
if kind ~= 'seated' then return fail('invalid_item', { zone_id = zone_id, reason = 'general-admission zone has no seat map' }) end
reap(prefix, now_ms(), tonumber(ARGV[7]), tonumber(ARGV[6]))

-- Seats are read by rank, not by score: the catalog's zset never changes after the event is loaded, and
-- ZRANGE by index answers in the same order as by score without formatting a score per seat, as
-- ZRANGEBYSCORE ... WITHSCORES did (INFO commandstats, a first page of 100 of 2,000 seats: ~120 -> ~75 us).
local skey, okey = prefix .. 'seats:' .. zone_id, prefix .. 'owner:' .. zone_id
local start = 0  -- rank of the next seat to examine
if after ~= '' then
  local rank = redis.call('ZRANK', skey, after)
  if not rank then return fail('unknown_seats', { zone_id = zone_id, seats = { after } }) end
  start = rank + 1
end

-- Without a status filter every seat read is returned, so read just one page (+1 to learn if more follow).
local chunk = math.min(scan_limit, 500)
if want == '' then chunk = math.min(limit + 1, 500) end
local out, scanned, last = {}, 0, nil
while #out < limit and scanned < scan_limit do
  local names = redis.call('ZRANGE', skey, start, start + chunk - 1)
  if #names == 0 then return cjson.encode({ seats = out, next = cjson.null }) end
  local owners = redis.call('HMGET', okey, unpack(names))
  for i, seat in ipairs(names) do
    local o = owners[i]
    local st = 'available'
    if o then
      if string.sub(o, 1, 2) == 's:' then st = 'sold' else st = 'held' end
    end
    scanned = scanned + 1
    last = seat
    start = start + 1
    if want == '' or want == st then
      out[#out + 1] = { seat = seat, status = st }
      if #out >= limit then break end
    end
    if scanned >= scan_limit then break end
  end
end
-- Is there anything after `last`?
if start >= redis.call('ZCARD', skey) then return cjson.encode({ seats = out, next = cjson.null }) end
return cjson.encode({ seats = out, next = last })
