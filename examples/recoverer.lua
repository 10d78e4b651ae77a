-- recoverer.lua: reboots failed machines through the provider's API,
-- backing off exponentially while the provider keeps failing.
--   bmdb-host examples/recoverer.lua     (BMDB_PROVIDER_URL: see provider.lua)
-- Against `build/fake-provider --fail-every N`, every Nth request of the
-- provider's API answers 503: provider.reboot raises naming the status, the
-- item is Failed with that cause and retried after 2 s, then 4 s, 8 s ...
-- while the provider keeps failing it; the first reboot answered 200 ends
-- the failure.
local bmdb = require "bmdb"
local provider = require "provider"

return {
  bmdb.worker {
    process = "Recover",
    concurrency = 2,
    timeout = 120,
    -- 2 s, 4 s, 8 s ... up to 60 s between attempts on one machine
    backoff = { initial = 2, maximum = 60, exponent = 2 },
    select = function(tx, limit)
      return tx:query([[
        SELECT f.machine_id FROM machine_failures f
        WHERE NOT EXISTS (SELECT 1 FROM work_blocked b
                          WHERE b.machine_id = f.machine_id AND b.process = 'Recover')
        ORDER BY f.reported_at
        LIMIT $1]], limit)
    end,
    run = function(w)
      local p = bmdb.transact(function(tx)
        return tx:one("SELECT provider_id FROM machine_provided WHERE machine_id = $1", w.machine)
      end)
      if not p then
        -- nothing to reboot yet: the provisioner has not created it
        return w:fail("no provider device recorded for this machine")
      end
      -- A raise (a 503, a timeout) fails the item: it is recorded with the
      -- error as cause and retried after the backoff; w.attempt counts the tries.
      provider.reboot(p.provider_id)
      w:finish(function(tx)
        tx:defer("DELETE FROM machine_failures WHERE machine_id = $1", w.machine)
      end)
      bmdb.log.info("rebooted", { machine = w.machine, provider_id = p.provider_id, attempt = w.attempt })
    end,
  },
}
