-- reconciler.lua: a reconcile loop, run by one host of the fleet at a time.
--   bmdb-host --migrations examples/migrations examples/reconciler.lua
-- Once a minute (BMDB_RECONCILE_EVERY seconds) it lists the provider's
-- devices and compares them with the BMDB: a device made for one of our
-- machines that the BMDB does not record (its create landed, but the
-- Provision item that made it never committed: its host died, its lock was
-- taken away) is adopted into machine_provided; devices for machines the
-- BMDB does not know are counted and logged. Run it on every host: one
-- holds the loop, the others take over if it dies (docs/loops.md).
local bmdb = require "bmdb"
local provider = require "provider"

local every = tonumber(os.getenv("BMDB_RECONCILE_EVERY") or "") or 60

return bmdb.loop {
  name = "provider-reconcile",
  every = every,
  timeout = 50,
  run = function(l)
    local devices = provider.list() -- outside any transaction: stops if the hold is lost
    local adopted, unknown = 0, 0
    bmdb.transact(function(tx) -- fenced by the hold: commits nothing once it is lost
      adopted, unknown = 0, 0
      for _, d in ipairs(devices) do
        if type(d.machine) == "string" and type(d.id) == "string" then
          local known = tx:one([[SELECT (SELECT provider_id FROM machine_provided WHERE machine_id = m.machine_id) AS device
                                 FROM machines m WHERE m.machine_id::TEXT = $1]], d.machine)
          if not known then
            unknown = unknown + 1
          elseif not known.device then
            adopted = adopted + tx:exec([[INSERT INTO machine_provided (machine_id, provider, provider_id)
                                          VALUES ($1, $2, $3) ON CONFLICT (machine_id) DO NOTHING]],
                                        d.machine, provider.name, d.id)
          end
        end
      end
    end)
    bmdb.log.info("reconciled", { devices = #devices, adopted = adopted, unknown = unknown, attempt = l.attempt })
  end,
}
