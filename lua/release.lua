--[[
  release: give an active hold's stock back at the customer's request. Idempotent.

  KEYS[1]  {evt:E}:meta
  ARGV[1]  hold_id            string
  ARGV[2]  retention_seconds  integer
  ARGV[3]  reap_limit         integer

  Returns JSON, one of:
    {"status": "released"}   released now or before
    {"status": "expired"}    it had already expired (its stock is back all the same)
    {"err": code, "details": {}} with code in event_not_found, hold_not_found, hold_confirmed
]]
--- @include common

local meta_key = KEYS[1]
local prefix = prefix_of(meta_key)
local hold_id = ARGV[1]
local retention = tonumber(ARGV[2])

if redis.call('EXISTS', meta_key) == 0 then return fail('event_not_found') end
local now = now_ms()
reap(prefix, now, tonumber(ARGV[3]), retention)

local h = redis.call('HMGET', prefix .. 'hold:' .. hold_id, 'status', 'expires_at_ms')
if not h[1] then return fail('hold_not_found') end
local status = settle(prefix, hold_id, h[1], h[2], now, retention)
if status == 'confirmed' then return fail('hold_confirmed') end
if status == 'active' then
  end_hold(prefix, hold_id, 'released', now, retention)
  status = 'released'
end
return cjson.encode({ status = status })
