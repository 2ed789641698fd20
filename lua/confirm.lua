--[[
  confirm: turn active holds into orders and append each order to the event's outbox, atomically. One call
  carries one or more confirms of the same event (the API batches the confirms of one event-loop tick, see
  ScriptRunner.batched); they run one after the other, as separate calls would, and each gets its own reply.

  KEYS[1]  {evt:E}:meta
  ARGV[1]  retention_seconds  integer, how long the hold record and order pointer stay in Redis
  ARGV[2]  reap_limit         integer, most expired holds reaped before the confirms (once per call)
  ARGV[3]  durable            "1": a WAITAOF follows this call on its connection (BOXOFFICE_WAIT_AOF), so a
                              repeat writes too; "": a repeat only reads
  then 3 arguments per confirm:
    hold_id      string
    order_id     string, chosen by the caller; used only if this call confirms the hold
    payment_ref  string

  Safe to run twice: a confirmed hold returns its existing order (created = false); when durable, it writes
  its unchanged status again, so that WAITAOF after a repeat covers the first confirm's writes.
  Works while the sale is paused (a paused event refuses new holds, not payment for given ones).

  Returns an array with one reply per confirm, in order, each one of:
    JSON {"order": O, "created": true, "outbox_id": id}   confirmed now
    JSON {"order": O, "created": false}                   confirmed before (a repeat)
    JSON {"err": code, "details": {}} with code in event_not_found, hold_not_found, hold_expired (also when
      expires_at_ms has passed but the hold was not reaped yet: it is reaped now), hold_released
    error reply  that confirm failed inside Redis; the others stand
  O = {order_id, event_id, hold_id, customer_id, items, amount_cents, payment_ref, confirmed_at_ms}
  The outbox entry has one field, "order", holding O as JSON (the same text as in the reply).
]]
--- @include common

local meta_key = KEYS[1]
local prefix = prefix_of(meta_key)
local retention = tonumber(ARGV[1])
local durable = ARGV[3] == '1'

-- Read once for every confirm of the call: the event, the clock; expired holds are reaped once.
local event_id = redis.call('HGET', meta_key, 'event_id')
local now
if event_id then
  now = now_ms()
  reap(prefix, now, tonumber(ARGV[2]), retention)
end
local expiry_key = prefix .. 'expiry'
local outbox_key = prefix .. 'outbox'

-- Tickets moved from held to sold by this call, per zone, written once at its end (nobody reads a zone
-- counter while a script runs; end_hold's own moves are increments too, so the order does not matter).
local moved = {}

local function order_of(h)
  return { order_id = h.order_id, event_id = event_id, hold_id = h.hold_id, customer_id = h.customer_id,
           items = h.items, amount_cents = h.amount_cents, payment_ref = h.payment_ref,
           confirmed_at_ms = h.confirmed_at_ms }
end

-- One confirm: the reply for it (see the header).
local function confirm(hold_id, order_id, payment_ref)
  if not event_id then return fail('event_not_found') end
  local hold = hold_view(prefix, hold_id)
  if not hold then return fail('hold_not_found') end

  if hold.status == 'confirmed' then
    if durable then
      -- A write on a repeat too (the same value: nothing changes), so a WAITAOF after this call on its
      -- connection waits for an AOF offset past the first confirm's writes (Inventory.confirm).
      redis.call('HSET', prefix .. 'hold:' .. hold_id, 'status', 'confirmed')
    end
    return cjson.encode({ order = order_of(hold), created = false })
  end
  local status = settle(prefix, hold_id, hold.status, hold.expires_at_ms, now, retention)
  if status == 'expired' then return fail('hold_expired', { expires_at_ms = hold.expires_at_ms }) end
  if status == 'released' then return fail('hold_released') end

  -- The hold's record first: if Redis refuses this confirm's first write (out of memory, it refuses a
  -- script's writes until one succeeds), nothing of it may wait in `moved`, which the end of the call
  -- writes once another confirm of the call has written something.
  local hkey = prefix .. 'hold:' .. hold_id
  local now_s = int(now)
  redis.call('HSET', hkey, 'status', 'confirmed', 'order_id', order_id, 'payment_ref', payment_ref,
    'confirmed_at_ms', now_s, 'ended_at_ms', now_s)
  move_stock(prefix, hold.items, 'held', 'sold', 's:' .. order_id, nil, moved)
  redis.call('EXPIRE', hkey, int(retention))
  redis.call('ZREM', expiry_key, hold_id)
  redis.call('SET', prefix .. 'order:' .. order_id, hold_id, 'EX', int(retention))

  hold.order_id, hold.payment_ref, hold.confirmed_at_ms = order_id, payment_ref, now
  local order = cjson.encode(order_of(hold))
  local outbox_id = redis.call('XADD', outbox_key, '*', 'order', order)
  -- The order's JSON is encoded once, for the outbox and the reply alike.
  return '{"order":' .. order .. ',"created":true,"outbox_id":"' .. outbox_id .. '"}'
end

-- Each confirm in its own protected call: one that fails inside Redis answers an error reply in its place
-- and does not take the others down (what it wrote before failing stays, as with any script error).
local replies = {}
for i = 4, #ARGV, 3 do
  local ok, reply = pcall(confirm, ARGV[i], ARGV[i + 1], ARGV[i + 2])
  if not ok then reply = error_reply(reply) end
  replies[#replies + 1] = reply
end
write_all_moved('confirm', prefix, moved, 'held', 'sold')
return replies
