-- recoverer.lua: reboots failed machines, backing off exponentially while
-- the provider keeps failing (the fake one fails the first two attempts).
--   bmdb-host examples/recoverer.lua
local bmdb = require "bmdb"
local provider = require "provider"

return {
  bmdb.worker {
    process = "Recover",
    concurrency = 2,
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
      -- A raise fails the item: it is recorded with the error as cause and
      -- retried after the backoff; w.attempt counts the tries.
      provider.call("reboot", w.machine, w.attempt)
      w:finish(function(tx)
        tx:defer("DELETE FROM machine_failures WHERE machine_id = $1", w.machine)
      end)
    end,
  },
}
