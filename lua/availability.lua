--[[
  availability: per-zone counters after reaping expired holds, so expired stock already counts as available.

  KEYS[1]  {evt:E}:meta
  ARGV[1]  retention_seconds  integer
  ARGV[2]  reap_limit         integer

  Returns JSON: {"status": "on_sale"|"paused", "zones": [{zone_id, kind, capacity, available, held, sold,
  price_cents}]} in catalog order, or {"err": "event_not_found"}.
  Invariant per zone: available + held + sold == capacity.
]]
--- @include common

local meta_key = KEYS[1]
local prefix = prefix_of(meta_key)
local meta = redis.call('HMGET', meta_key, 'status', 'zones')
if not meta[1] then return fail('event_not_found') end
reap(prefix, now_ms(), tonumber(ARGV[2]), tonumber(ARGV[1]))

local zones = {}
for _, zone_id in ipairs(cjson.decode(meta[2])) do
  local z = redis.call('HMGET', prefix .. 'zone:' .. zone_id, 'kind', 'capacity', 'available', 'held', 'sold', 'price_cents')
  zones[#zones + 1] = { zone_id = zone_id, kind = z[1], capacity = tonumber(z[2]), available = tonumber(z[3]),
                        held = tonumber(z[4]), sold = tonumber(z[5]), price_cents = tonumber(z[6]) }
end
return cjson.encode({ status = meta[1], zones = zones })
