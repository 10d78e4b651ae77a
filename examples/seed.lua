-- seed.lua: a one-off that adds machines to the fleet.
--   bmdb-host examples/seed.lua [COUNT]
local bmdb = require "bmdb"

local count = tonumber(arg[1] or "5")
if not count or count < 1 or count ~= math.floor(count) then
  error("usage: bmdb-host examples/seed.lua [COUNT]  (COUNT a whole number >= 1, got " .. tostring(arg[1]) .. ")", 0)
end

local total = bmdb.transact(function(tx)
  for _ = 1, count do tx:exec("INSERT INTO machines DEFAULT VALUES") end
  return tx:one("SELECT count(*) AS n FROM machines").n
end)
print(string.format("added %d machines; the fleet has %d", count, total))
