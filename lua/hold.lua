--[[
  hold: put stock aside for customers, each hold all of its items or none. One call carries one or more
  holds of the same event (the API batches the holds of one event-loop tick, see ScriptRunner.batched);
  they run one after the other, as separate calls would, and each gets its own reply.

  KEYS[1]  {evt:E}:meta       event hash (other keys of the event are built from its prefix)
  ARGV[1]  retention_seconds  integer, how long a hold record outlives its end
  ARGV[2]  reap_limit         integer, most expired holds reaped per batch, only when a refusal could
                              come from holds that expired but wait to be reaped; at most REAP_BATCHES
                              batches a call, so one call never blocks Redis for long (the sweeper does
                              the rest)
  then 5 arguments per hold:
    hold_id           string, chosen by the caller; a second call with the same id returns the first
                      hold unchanged (safe to run twice: a call is sent again after a timeout)
    customer_id       string
    ttl_seconds       integer, 0 = the event's hold_ttl_seconds
    items             JSON [{"zone_id": Z, "quantity": n} | {"zone_id": Z, "seats": [label, ...]}],
                      zones distinct, seat labels normalised and distinct
    idempotency       "" (no key) or "<body_sha256 hex> <idempotency_ttl_seconds> <idempotency_key>"

  Returns an array with one reply per hold, in order, each one of:
    array [tickets, amount_cents, created_at_ms, expires_at_ms]  (integers) the hold was created now, as
                                  asked: status active. The hot path: no JSON to encode here nor to
                                  decode in the caller.
    JSON {"hold": H, "replay": false}  an earlier run with the same hold_id created it
    JSON {"hold": H, "replay": true}   the idempotency key was used before with the same body
    JSON {"err": code, "details": {...}} with code in
      event_not_found, sale_paused, zone_not_found {zone_id}, invalid_item {zone_id, reason},
      unknown_seats {zone_id, seats}, ttl_too_long {max_ttl_seconds},
      idempotency_conflict, sold_out {zone_id, requested, available},
      seats_unavailable {seats: [{zone_id, seat}]}, limit_exceeded {limit, current, requested}
    error reply  that hold failed inside Redis; the others stand. (Out of memory, Redis refuses a script's
                 writes until its first one succeeds: then every hold of the call that must write fails.)
  H = {hold_id, customer_id, status, items, tickets, amount_cents, created_at_ms, expires_at_ms, ...}
]]
--- @include common

local REAP_BATCHES = 10

local meta_key = KEYS[1]
local prefix = prefix_of(meta_key)
local retention = tonumber(ARGV[1])
local reap_limit = tonumber(ARGV[2])
local reaps_left = REAP_BATCHES

-- Read once for every hold of the call: the clock, and the event (no hold changes it).
local now = now_ms()
local meta = redis.call('HMGET', meta_key, 'status', 'hold_ttl_seconds', 'max_tickets_per_customer')
local max_ttl, limit = tonumber(meta[2]), tonumber(meta[3])
local ckey = prefix .. 'customers'
local expiry_key = prefix .. 'expiry'

-- Zones are read once per call and their counters written once, at its end: the holds of one call nearly
-- always take tickets of the same few zones. zones[Z] is Redis' HMGET reply {kind, available, price_cents,
-- held} (numbers) from the first read, false for no such zone; what this call's holds took since waits in
-- `moved`. Before anything else moves stock (reaping, settling a hold read back), sync() writes the
-- moves and forgets the zones. (redis-server under callgrind, GA holds: 125.1k -> 101.2k instructions per
-- hold at 12 holds a call, 208.8k -> 200.7k at 2; a call of one hold pays ~10k more, ~5 %.)
local zones, moved = {}, {}

local function zone(zone_id)
  local z = zones[zone_id]
  if z == nil then
    z = redis.call('HMGET', prefix .. 'zone:' .. zone_id, 'kind', 'available', 'price_cents', 'held')
    if z[1] then
      z[2], z[3], z[4] = tonumber(z[2]), tonumber(z[3]), tonumber(z[4])
    else
      z = false
    end
    zones[zone_id] = z
  end
  return z
end

-- Each distinct items JSON is decoded once per call: a sale's general-admission holds repeat a few shapes
-- (the tables are only read). Callgrind, 12 holds a call: 99.0k -> 93.5k instructions per hold when all
-- are alike, 151.1k -> 152.3k for seat holds that all differ.
local decoded = {}

local function sync()
  write_moved(prefix, moved, 'available', 'held')
  zones = {}
end

-- Reap one more batch of expired holds, if this call may still: true if it reaped any.
local function reap_more()
  if reaps_left == 0 then return false end
  reaps_left = reaps_left - 1
  sync()
  return reap(prefix, now, reap_limit, retention) > 0
end

-- No reaping up front: a hold that fits does not need expired stock back, and every refusal below reaps
-- and checks again. A hold read back is settled (an active one past its expiry is ended as expired).
local function view(id)
  sync()
  local h = hold_view(prefix, id)
  if h then h.status = settle(prefix, id, h.status, h.expires_at_ms, now, retention) end
  return h
end

-- Check every item before writing anything: all or none. Returns true, tickets, amount when all fit,
-- else false, the refusal reply, whether reaping more expired holds could change the answer (reaping
-- turns held stock and seats into available ones: never sold ones), and the ids of the holds that have
-- the asked-for seats (nil if none). A malformed item refuses at once; otherwise every item is looked at,
-- and the first general-admission item short of stock is the refusal, else the seats taken.
local function check(items)
  local tickets, amount = 0, 0
  local taken, sold, holders, short
  for _, item in ipairs(items) do
    local z = zone(item.zone_id)
    if not z then return false, fail('zone_not_found', { zone_id = item.zone_id }), false end
    if item.seats then
      if z[1] ~= 'seated' then return false, fail('invalid_item', { zone_id = item.zone_id, reason = 'general-admission zone: give quantity, not seats' }), false end
      local skey = prefix .. 'seats:' .. item.zone_id
      local unknown = {}
      for _, seat in ipairs(item.seats) do
        if not redis.call('ZSCORE', skey, seat) then unknown[#unknown + 1] = seat end
      end
      if #unknown > 0 then return false, fail('unknown_seats', { zone_id = item.zone_id, seats = unknown }), false end
      local owners = redis.call('HMGET', prefix .. 'owner:' .. item.zone_id, unpack(item.seats))
      for i, seat in ipairs(item.seats) do
        if owners[i] then
          taken = taken or {}
          taken[#taken + 1] = { zone_id = item.zone_id, seat = seat }
          if string.sub(owners[i], 1, 2) == 's:' then
            sold = true
          else
            holders = holders or {}
            holders[#holders + 1] = string.sub(owners[i], 3)
          end
        end
      end
    else
      if z[1] ~= 'ga' then return false, fail('invalid_item', { zone_id = item.zone_id, reason = 'seated zone: give seats, not quantity' }), false end
      local available = z[2] - (moved[item.zone_id] or 0)
      if item.quantity > available and not short then
        -- only stock held when the zone was read (z[4]; this call's own holds are not expired) can come back
        short = { fail('sold_out', { zone_id = item.zone_id, requested = item.quantity, available = available }),
          item.quantity <= available + z[4] }
      end
    end
    local n = item_count(item)
    tickets = tickets + n
    amount = amount + n * z[3]
  end
  if short then return false, short[1], short[2] and not sold, holders end
  if taken then return false, fail('seats_unavailable', { seats = taken }), not sold, holders end
  return true, tickets, amount
end

-- One hold: the reply for it (see the header).
local function hold(hold_id, customer_id, ttl_seconds, items_json, idempotency)
  -- Nearly always a new id: EXISTS answers that for less than reading the hold (callgrind: 2k of ~133k).
  local hkey = prefix .. 'hold:' .. hold_id
  if redis.call('EXISTS', hkey) == 1 then
    return cjson.encode({ hold = view(hold_id), replay = false })
  end

  if not meta[1] then return fail('event_not_found') end

  local idem, body_sha, idem_ttl = nil, nil, nil
  if idempotency ~= '' then
    local key
    body_sha, idem_ttl, key = string.match(idempotency, '^(%S+) (%S+) (.+)$')
    idem = prefix .. 'idem:' .. key
    local seen = redis.call('GET', idem)
    if seen then
      local sha, first_id = string.match(seen, '^(%S+) (%S+)$')
      if sha ~= body_sha then return fail('idempotency_conflict') end
      local first = view(first_id)
      if first then return cjson.encode({ hold = first, replay = true }) end
      -- the first hold's record is gone (past retention): treat the key as fresh
    end
  end

  if meta[1] ~= 'on_sale' then return fail('sale_paused') end

  if ttl_seconds == 0 then ttl_seconds = max_ttl end
  if ttl_seconds > max_ttl then return fail('ttl_too_long', { max_ttl_seconds = max_ttl }) end

  -- A refusal must not come from holds that have expired but wait in the reaping queue (a flash sale
  -- expires many holds in the same millisecond): while one could change the answer, reap another batch,
  -- up to REAP_BATCHES a call (a longer backlog, e.g. thousands of holds run out in the same second, is the
  -- sweeper's: its next pass, at most 0.25 s later, gives the rest back).
  local items = decoded[items_json]
  if not items then
    items = cjson.decode(items_json)
    decoded[items_json] = items
  end
  local fits, result, extra, holders = check(items)
  if not fits and (extra or holders) then
    local wanted = 0
    for _, item in ipairs(items) do wanted = wanted + item_count(item) end
    if wanted > limit then  -- over the limit on its own: no reaping or settling can make it fit
      local current = tonumber(redis.call('HGET', ckey, customer_id)) or 0
      return fail('limit_exceeded', { limit = limit, current = current, requested = wanted })
    end
  end
  -- Seats held by holds that have run out: settle exactly those, wherever they wait in the reaping queue
  -- (also when the hold is refused anyway: the reply then lists only seats that are really taken). A seat
  -- still held by a hold that has not run out refuses whatever else comes back: then no reaping.
  if holders then
    sync()
    local settled = false
    for _, id in ipairs(holders) do  -- settling one twice changes nothing
      local h = redis.call('HMGET', prefix .. 'hold:' .. id, 'status', 'expires_at_ms')
      if h[1] and settle(prefix, id, h[1], h[2], now, retention) == 'expired' then settled = true end
    end
    if settled then fits, result, extra, holders = check(items) end
    if holders then extra = false end  -- still held, by holds that have not run out: reaping cannot help
  end
  while not fits and extra do
    if not reap_more() then break end
    fits, result, extra = check(items)
  end
  if not fits then return result end
  local tickets, amount = result, extra

  -- The customer's limit: count the tickets in first and take them back if that passes the limit, so a
  -- hold that fits (nearly all of them) pays one call here, not a read and a write. Reaping only ever
  -- lowers the count and gives stock back, so the checks above still hold after it.
  local count = redis.call('HINCRBY', ckey, customer_id, int(tickets))
  while count > limit do
    count = redis.call('HINCRBY', ckey, customer_id, int(-tickets))
    if tickets > limit or not reap_more() then  -- over the limit on its own: no reaping can help
      if count <= 0 then redis.call('HDEL', ckey, customer_id) end
      return fail('limit_exceeded', { limit = limit, current = count, requested = tickets })
    end
    count = redis.call('HINCRBY', ckey, customer_id, int(tickets))
  end

  -- Write.
  move_stock(prefix, items, 'available', 'held', 'h:' .. hold_id, nil, moved)
  local expires_at = now + ttl_seconds * 1000
  local expires_s = int(expires_at)
  redis.call('HSET', hkey, 'hold_id', hold_id, 'customer_id', customer_id, 'status', 'active',
    'items', items_json, 'tickets', int(tickets), 'amount_cents', int(amount),
    'created_at_ms', int(now), 'expires_at_ms', expires_s)
  -- No TTL while active: the record must outlive any reaping delay, or its stock would stay held for good.
  -- It gets hold_retention_seconds when it ends (end_hold, confirm).
  redis.call('ZADD', expiry_key, expires_s, hold_id)
  if idem then
    redis.call('SET', idem, body_sha .. ' ' .. hold_id, 'EX', idem_ttl)
  end
  return { tickets, amount, now, expires_at }
end

-- Each hold in its own protected call: one that fails inside Redis answers an error reply in its place
-- and does not take the others down (what it wrote before failing stays, as with any script error).
local replies = {}
for i = 3, #ARGV, 5 do
  local ok, reply = pcall(hold, ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3], ARGV[i + 4])
  if not ok then reply = error_reply(reply) end
  replies[#replies + 1] = reply
end
-- The holds above are answered and written: now the zones' counters.
write_all_moved('hold', prefix, moved, 'available', 'held')
return replies
