-- An operator's spec for the example workers, written with bmdb.testing.
-- Run it like any busted spec (README: "Testing your own workers").
local T = require "bmdb.testing"

describe("the example workers", function()
  local db

  setup(function() db = T.database { migrations = "examples/migrations" } end)
  teardown(function() db:close() end)

  local function new_machine()
    return db:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
  end

  it("provisioner: provisions a new machine once", function()
    local m = new_machine()
    local r = T.run_one("examples/provisioner.lua", "Provision", { machine = m })
    assert.same({ machine = m, attempt = 1, event = "Finished" }, r)
    local p = db:one("SELECT provider, provider_id FROM machine_provided WHERE machine_id = $1", m)
    assert.same({ provider = "fake", provider_id = "fake-" .. m:sub(1, 8) }, p)
    -- provided now: no longer a candidate
    assert.is_nil(T.run_one("examples/provisioner.lua", "Provision", { machine = m }))
  end)

  it("recoverer: fails into backoff while the provider fails", function()
    local m = new_machine()
    db:exec("INSERT INTO machine_failures (machine_id, reason) VALUES ($1, 'test')", m)
    local r = T.run_one("examples/recoverer.lua", "Recover", { machine = m })
    assert.equal("Failed", r.event)
    assert.matches("BMC of " .. m .. " did not answer", tostring(r.error), 1, true)
    local b = db:one("SELECT last_seconds, attempts FROM work_backoff WHERE machine_id = $1", m)
    assert.same({ last_seconds = 2, attempts = 1 }, b)
    -- in backoff: not offered again until it ends
    assert.is_nil(T.run_one("examples/recoverer.lua", "Recover", { machine = m }))
  end)
end)
