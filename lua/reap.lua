--[[
  reap: expire holds whose expires_at_ms has passed and give their stock back (the sweeper's call, for
  events that get no other traffic).

  KEYS[1]  {evt:E}:meta
  ARGV[1]  retention_seconds  integer
  ARGV[2]  reap_limit         integer, most holds reaped by this call

  Returns: integer, holds reaped (call again while it equals reap_limit).
]]
--- @include common

local prefix = prefix_of(KEYS[1])
return reap(prefix, now_ms(), tonumber(ARGV[2]), tonumber(ARGV[1]))
