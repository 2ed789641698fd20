--[[
  Shared by every script (spliced in by service/scripts.py where a script says `--- @include common`).

  Key layout of one event; every key carries the hash tag {evt:<event_id>} so a script touches one
  Redis Cluster slot. `prefix` is "{evt:<event_id>}:".
    prefix.."meta"          hash   event_id, name, starts_at, hold_ttl_seconds, max_tickets_per_customer,
                                   status (on_sale|paused), zones (JSON array of zone ids)
    prefix.."zone:"..Z      hash   kind (ga|seated), capacity, available, held, sold, price_cents
    prefix.."seats:"..Z     zset   seat label -> position in the seat map (seated zones)
    prefix.."owner:"..Z     hash   seat label -> "h:<hold_id>" (held) or "s:<order_id>" (sold)
    prefix.."hold:"..H      hash   hold_id, customer_id, status, items (JSON), tickets, amount_cents,
                                   created_at_ms, expires_at_ms, [ended_at_ms], [order_id, payment_ref,
                                   confirmed_at_ms]; key TTL: none while active, retention after it ends
    prefix.."expiry"        zset   hold_id -> expires_at_ms, active holds only
    prefix.."customers"     hash   customer_id -> tickets in active holds + confirmed orders
    prefix.."idem:"..K      string "<body_sha256> <hold_id>", TTL idempotency_ttl_seconds
    prefix.."order:"..O     string hold_id, TTL retention
    prefix.."outbox"        stream one entry per confirmed order, field "order" = order JSON
]]

-- An integer as the string Redis gets. Lua 5.1 turns a number argument of redis.call into a string with
-- "%.14g", a floating-point conversion that was the largest single cost in Redis' profile of the hold
-- script (callgrind: 12 conversions, about 13 % of its instructions); "%d" is a plain integer conversion.
-- string.format still costs a sprintf (8 a hold, 7 % of a batched hold's instructions), and the holds of
-- one call convert the same few numbers (quantities, prices, the clock, expiry times) over and over: each
-- distinct number is converted once per script call. The table lives as long as the call.
local int_strings = {}
local function int(n)
  local s = int_strings[n]
  if not s then
    s = string.format('%d', n)
    int_strings[n] = s
  end
  return s
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function prefix_of(meta_key)
  return string.sub(meta_key, 1, #meta_key - 4) -- strip "meta"
end

local function item_count(item)
  if item.seats then return #item.seats end
  return item.quantity
end

-- The hold as a table, or nil when its record is gone.
local function hold_view(prefix, hold_id)
  local f = redis.call('HGETALL', prefix .. 'hold:' .. hold_id)
  if #f == 0 then return nil end
  local h = {}
  for i = 1, #f, 2 do h[f[i]] = f[i + 1] end
  local view = {
    hold_id = h.hold_id, customer_id = h.customer_id, status = h.status,
    items = cjson.decode(h.items), amount_cents = tonumber(h.amount_cents),
    tickets = tonumber(h.tickets),
    created_at_ms = tonumber(h.created_at_ms), expires_at_ms = tonumber(h.expires_at_ms),
  }
  if h.ended_at_ms then view.ended_at_ms = tonumber(h.ended_at_ms) end
  if h.order_id then
    view.order_id = h.order_id
    view.payment_ref = h.payment_ref
    view.confirmed_at_ms = tonumber(h.confirmed_at_ms)
  end
  return view
end

-- Move n tickets of one zone from counter `from` to counter `to`.
local function move_count(prefix, zone_id, from, to, n)
  local zkey = prefix .. 'zone:' .. zone_id
  redis.call('HINCRBY', zkey, from, int(-n))
  redis.call('HINCRBY', zkey, to, int(n))
end

-- Move every item's tickets from one counter of its zone to another ('available' | 'held' | 'sold'),
-- keeping available + held + sold == capacity. Seats get owner `mark` ("h:<hold>" or "s:<order>"); with
-- mark nil, seats still owned by `previous` are freed. The one place a hold's stock changes hands.
-- With a table `moved`, the counters are only added up there per zone (zone_id -> tickets) for
-- write_moved to write later in the same script (nobody sees a counter while a script runs).
local function move_stock(prefix, items, from, to, mark, previous, moved)
  for _, item in ipairs(items) do
    if item.seats then
      local okey = prefix .. 'owner:' .. item.zone_id
      for _, seat in ipairs(item.seats) do
        if mark then
          redis.call('HSET', okey, seat, mark)
        elseif redis.call('HGET', okey, seat) == previous then
          redis.call('HDEL', okey, seat)
        end
      end
    end
    local n = item_count(item)
    if moved then
      moved[item.zone_id] = (moved[item.zone_id] or 0) + n
    else
      move_count(prefix, item.zone_id, from, to, n)
    end
  end
end

-- Write and clear what move_stock added up in `moved`: one pair of HINCRBY per zone. Each zone is
-- cleared before its write, so a write that fails is never repeated by a later call.
local function write_moved(prefix, moved, from, to)
  for zone_id, n in pairs(moved) do
    moved[zone_id] = nil
    if n ~= 0 then move_count(prefix, zone_id, from, to, n) end
  end
end

-- The error reply standing in for one item of a batched call whose own run failed (pcall's error value:
-- a Redis error reply as a table, or a Lua error as a string).
local function error_reply(err)
  return { err = type(err) == 'table' and err.err or tostring(err) }
end

-- At the end of a batched call, once every item is answered and written: write what `moved` holds. A zone
-- whose counters cannot be written (only if they were corrupted, not integers) must not fail the whole
-- call, nor keep the other zones' counters from being written; write_moved clears each zone before
-- writing it, so every round drops at least one. `script` names the caller in Redis' log.
local function write_all_moved(script, prefix, moved, from, to)
  while next(moved) do
    local ok, err = pcall(write_moved, prefix, moved, from, to)
    if not ok then
      redis.log(redis.LOG_WARNING, script .. ': zone counters of ' .. prefix .. ' not written: ' ..
        tostring(error_reply(err).err))
    end
  end
end

-- End an active hold as "released" or "expired": its stock and seats go back, it leaves the expiry set.
-- Returns true if the hold was active. Anything already terminal is left untouched.
local function end_hold(prefix, hold_id, status, at_ms, retention_seconds)
  local hkey = prefix .. 'hold:' .. hold_id
  local h = redis.call('HMGET', hkey, 'status', 'items', 'customer_id', 'tickets')
  redis.call('ZREM', prefix .. 'expiry', hold_id)
  if h[1] ~= 'active' then return false end
  move_stock(prefix, cjson.decode(h[2]), 'held', 'available', nil, 'h:' .. hold_id)
  local ckey = prefix .. 'customers'
  if redis.call('HINCRBY', ckey, h[3], int(-tonumber(h[4]))) <= 0 then redis.call('HDEL', ckey, h[3]) end
  redis.call('HSET', hkey, 'status', status, 'ended_at_ms', int(at_ms))
  redis.call('EXPIRE', hkey, int(retention_seconds))
  return true
end

-- A hold's status as of `now`: an active hold past its expires_at_ms is ended as expired here and now (it
-- may still wait in the reaping queue), so no script acts on a hold that has run out. The one place
-- that rule lives; returns the status after that.
local function settle(prefix, hold_id, status, expires_at_ms, now, retention_seconds)
  if status == 'active' and tonumber(expires_at_ms) <= now then
    end_hold(prefix, hold_id, 'expired', now, retention_seconds)
    return 'expired'
  end
  return status
end

-- Reap up to `limit` holds whose expires_at_ms <= now. Returns how many were reaped.
local function reap(prefix, now, limit, retention_seconds)
  local ids = redis.call('ZRANGEBYSCORE', prefix .. 'expiry', '-inf', int(now), 'LIMIT', '0', int(limit))
  for _, hold_id in ipairs(ids) do
    end_hold(prefix, hold_id, 'expired', now, retention_seconds)
  end
  return #ids
end

local function fail(code, details)
  return cjson.encode({ err = code, details = details or {} })
end
