-- report-failure.lua: a one-off that marks provided machines as failed, as
-- a monitoring system would, so the recoverer has something to do.
--   bmdb-host examples/report-failure.lua [COUNT]
local bmdb = require "bmdb"

local count = tonumber(arg[1] or "2")
if not count or count < 1 or count ~= math.floor(count) then
  error("usage: bmdb-host examples/report-failure.lua [COUNT]  (COUNT a whole number >= 1, got " ..
        tostring(arg[1]) .. ")", 0)
end
local n = bmdb.transact(function(tx)
  return tx:exec([[
    INSERT INTO machine_failures (machine_id, reason)
    SELECT p.machine_id, 'agent heartbeat missing' FROM machine_provided p
    WHERE NOT EXISTS (SELECT 1 FROM machine_failures f WHERE f.machine_id = p.machine_id)
    LIMIT $1]], count)
end)
bmdb.wake("Recover") -- idle recoverers react now, not at their next poll
print(string.format("reported %d failed machines", n))
