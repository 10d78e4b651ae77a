-- bench/exec_loop.lua -- bmdb.exec{argv = {"true"}} N times in a one-off
-- script, and the spawns per second; bench/spawn_loop.c is the same loop
-- with posix_spawn alone. Run by the binary:
--
--   bmdb-host bench/exec_loop.lua [N]   (N: 2000)
local bmdb = require "bmdb"
local core = require "bmdb.core"

local n = tonumber(arg[1] or 2000)
assert(n and n > 0, "usage: bmdb-host bench/exec_loop.lua [N > 0]")
local t0 = core.now()
for _ = 1, n do
  local r = bmdb.exec { argv = { "true" } }
  if r.status ~= 0 then error("true failed: " .. tostring(r.status or r.signal)) end
end
local s = core.now() - t0
print(string.format("bmdb.exec of true: %d spawns in %.3f s: %.0f spawns/s", n, s, n / s))
