-- provisioner.lua: takes new machines through the provider's API.
--   bmdb-host examples/provisioner.lua     (BMDB_PROVIDER_URL: see provider.lua)
-- A machine is a candidate while it has no machine_provided row and no
-- live work or backoff for Provision. Run as many copies as you like: the
-- work rows keep any machine from being provisioned twice at once, and the
-- create's idempotency key (the machine's id) keeps a retried create from
-- making a second device. Creates share the fleet's rate limit
-- ("provider-create", provider.lua).
local bmdb = require "bmdb"
local provider = require "provider"

return {
  bmdb.worker {
    process = "Provision",
    concurrency = 4,
    timeout = 300,
    -- a failed create (a 503, a timeout) is retried after 5 s, 10 s, ... 300 s
    backoff = { initial = 5, maximum = 300, exponent = 2 },
    select = function(tx, limit)
      return tx:query([[
        SELECT m.machine_id FROM machines m
        WHERE NOT EXISTS (SELECT 1 FROM machine_provided p WHERE p.machine_id = m.machine_id)
          AND NOT EXISTS (SELECT 1 FROM work_blocked b
                          WHERE b.machine_id = m.machine_id AND b.process = 'Provision')
        ORDER BY m.created_at
        LIMIT $1]], limit)
    end,
    run = function(w)
      -- Outside any transaction: the provider call may take minutes.
      local id = provider.create(w.machine)
      -- The commit function needs no answer: deferred, its INSERT rides
      -- with the release and COMMIT in one round trip.
      w:finish(function(tx)
        tx:defer("INSERT INTO machine_provided (machine_id, provider, provider_id) VALUES ($1, $2, $3)",
                w.machine, provider.name, id)
      end)
      bmdb.log.info("provisioned", { machine = w.machine, provider_id = id })
    end,
  },
}
