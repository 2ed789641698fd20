--[[
  get_hold: read one hold, reaping expired holds first so the status is never stale.

  KEYS[1]  {evt:E}:meta
  ARGV[1]  hold_id            string
  ARGV[2]  retention_seconds  integer
  ARGV[3]  reap_limit         integer

  Returns JSON: {"hold": H} (see hold.lua) or {"err": code} with code in event_not_found, hold_not_found.
]]
--- @include common

local meta_key = KEYS[1]
local prefix = prefix_of(meta_key)
local hold_id = ARGV[1]
local retention = tonumber(ARGV[2])

if redis.call('EXISTS', meta_key) == 0 then return fail('event_not_found') end
local now = now_ms()
reap(prefix, now, tonumber(ARGV[3]), retention)
local hold = hold_view(prefix, hold_id)
if not hold then return fail('hold_not_found') end
hold.status = settle(prefix, hold_id, hold.status, hold.expires_at_ms, now, retention)
return cjson.encode({ hold = hold })
