--[[
  confirm: turn an active hold into an order and append the order to the event's outbox, atomically.

  KEYS[1]  {evt:E}:meta
  ARGV[1]  hold_id            string
  ARGV[2]  order_id           string, chosen by the caller; used only if this call confirms the hold
  ARGV[3]  payment_ref        string
  ARGV[4]  retention_seconds  integer, how long the hold record and order pointer stay in Redis
  ARGV[5]  reap_limit         integer
  ARGV[6]  durable            "1": a WAITAOF follows this call on its connection (BOXOFFICE_WAIT_AOF), so a
                              repeat writes too; "" or absent: a repeat only reads

  Safe to run twice: a confirmed hold returns its existing order (created = false); when durable, it writes
  its unchanged status again, so that WAITAOF after a repeat covers the first confirm's writes.
  Works while the sale is paused (a paused event refuses new holds, not payment for given ones).

  Returns JSON, one of:
    {"order": O, "created": true|false, "outbox_id": id|null}
    {"err": code, "details": {}} with code in event_not_found, hold_not_found, hold_expired (also when
      expires_at_ms has passed but the hold was not reaped yet: it is reaped now), hold_released
  O = {order_id, event_id, hold_id, customer_id, items, amount_cents, payment_ref, confirmed_at_ms}
  The outbox entry has one field, "order", holding O as JSON.
]]
--- @include common

local meta_key = KEYS[1]
local prefix = prefix_of(meta_key)
local hold_id = ARGV[1]
local retention = tonumber(ARGV[4])

local event_id = redis.call('HGET', meta_key, 'event_id')
if not event_id then return fail('event_not_found') end

local now = now_ms()
reap(prefix, now, tonumber(ARGV[5]), retention)

local hold = hold_view(prefix, hold_id)
if not hold then return fail('hold_not_found') end

local function order_of(h)
  return { order_id = h.order_id, event_id = event_id, hold_id = h.hold_id, customer_id = h.customer_id,
           items = h.items, amount_cents = h.amount_cents, payment_ref = h.payment_ref,
           confirmed_at_ms = h.confirmed_at_ms }
end

if hold.status == 'confirmed' then
  if ARGV[6] == '1' then
    -- A write on a repeat too (the same value: nothing changes), so a WAITAOF after this call on its
    -- connection waits for an AOF offset past the first confirm's writes (Inventory.confirm).
    redis.call('HSET', prefix .. 'hold:' .. hold_id, 'status', 'confirmed')
  end
  return cjson.encode({ order = order_of(hold), created = false })
end
hold.status = settle(prefix, hold_id, hold.status, hold.expires_at_ms, now, retention)
if hold.status == 'expired' then return fail('hold_expired', { expires_at_ms = hold.expires_at_ms }) end
if hold.status == 'released' then return fail('hold_released') end

local order_id = ARGV[2]
move_stock(prefix, hold.items, 'held', 'sold', 's:' .. order_id)
local hkey = prefix .. 'hold:' .. hold_id
redis.call('HSET', hkey, 'status', 'confirmed', 'order_id', order_id, 'payment_ref', ARGV[3],
  'confirmed_at_ms', int(now), 'ended_at_ms', int(now))
redis.call('EXPIRE', hkey, int(retention))
redis.call('ZREM', prefix .. 'expiry', hold_id)
redis.call('SET', prefix .. 'order:' .. order_id, hold_id, 'EX', int(retention))

hold.order_id, hold.payment_ref, hold.confirmed_at_ms = order_id, ARGV[3], now
local order = order_of(hold)
local outbox_id = redis.call('XADD', prefix .. 'outbox', '*', 'order', cjson.encode(order))
return cjson.encode({ order = order, created = true, outbox_id = outbox_id })
