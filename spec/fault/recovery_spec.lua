-- Fault suite, guarantees 4 and 5: a host killed with SIGKILL frees its
-- locks within one interval, and SIGTERM drains (items in flight finish
-- within --grace, the rest are cancelled and recorded; a second signal
-- cancels at once; the session row goes).
local H = require "support.helpers"
local F = require "support.faults"

describe("fault: crash recovery and drain", function()
  local dsn, admin, dir
  local killed, faults, survived, items = 0, 0, 0, 0

  setup(function()
    dsn, admin = F.database()
    dir = H.tmpdir("fault-recovery")
    H.write_file(dir .. "/fault.lua", F.script())
  end)

  teardown(function()
    F.figures("crash recovery and drain", { items = items, killed = killed, faults = faults, survived = survived })
    admin:close()
  end)

  local function events(m) return H.events(admin, m) end

  local function host(name, hold, args)
    local h = F.host(dsn, name, dir .. "/fault.lua", { args = args, env = { CONC = "1", HOLD = hold, FIXED = "1" } })
    h:await("stderr", "workers started", 30)
    return h
  end

  it("frees a killed host's lock within one interval; another host takes it over", function()
    local m = F.machines(admin, 1, 1)[1]
    local a = host("crashA", "600")
    local sid = H.wait_until(function() return a:stdout():match("running %S+ (%S+)") end, 30, "crashA to run the item")
    local b = host("crashB", "0")
    a:kill("KILL")
    local killed_at = admin:one("SELECT clock_timestamp()::TEXT AS t").t
    killed = killed + 1
    faults = faults + 1
    -- the dead session's deadline in the database is at most one interval
    -- after the kill (unless a claim already collected it)
    local s = admin:one("SELECT extract(epoch FROM deadline - $1::TIMESTAMPTZ)::FLOAT8 AS left FROM sessions WHERE session_id = $2",
      killed_at, sid)
    if s then assert.is_true(s.left <= 2, "deadline " .. s.left .. "s after the kill, interval 2s") end
    H.wait_until(function() return events(m)[4] == "Finished" end, 30, "crashB to take over and finish")
    assert.same({ "Started", "Abandoned", "Started", "Finished" }, events(m))
    local took = admin:one([[SELECT extract(epoch FROM occurred_at - $1::TIMESTAMPTZ)::TEXT AS s FROM work_history
      WHERE machine_id = $2 AND event = 'Started' AND session_id <> $3]], killed_at, m, sid).s
    print("\n  takeover " .. took .. "s after kill -9 (interval 2s)")
    b:kill("TERM")
    assert.equal(0, b:wait(60), b:stderr())
    items = items + 1
    survived = survived + 1
  end)

  it("drains: an item that ends within --grace finishes, nothing new is claimed", function()
    local ids = F.machines(admin, 1, 1)
    local h = host("drain1", "1", { "--grace", "60" })
    h:await("stdout", "running " .. ids[1], 30)
    h:kill("TERM")
    faults = faults + 1
    h:await("stderr", "draining", 30)
    local later = F.machines(admin, 2, 1)
    admin:exec("SELECT pg_notify('bmdb_wake', 'Fault')")
    assert.equal(0, h:wait(90), h:stderr())
    assert.same({ "Started", "Finished" }, events(ids[1]))
    assert.same({}, events(later[1]))
    assert.same({}, events(later[2]))
    assert.equal(0, admin:count("SELECT 1 FROM sessions WHERE component_name = 'fault'"))
    admin:exec("DELETE FROM passes WHERE machine_id IN ($1, $2)", later[1], later[2])
    items = items + 1
    survived = survived + 1
  end)

  it("drains: an item that outlives --grace is cancelled and recorded Canceled", function()
    local m = F.machines(admin, 1, 1)[1]
    local h = host("drain2", "600", { "--grace", "1" })
    h:await("stdout", "running " .. m, 30)
    h:kill("TERM")
    faults = faults + 1
    assert.equal(0, h:wait(90), h:stderr())
    assert.same({ "Started", "Canceled" }, events(m))
    assert.equal(0, admin:count("SELECT 1 FROM work"))
    assert.equal(0, admin:count("SELECT 1 FROM sessions WHERE component_name = 'fault'"))
    assert.matches('msg="work canceled"', h:stderr(), 1, true)
    admin:exec("DELETE FROM passes WHERE machine_id = $1", m)
    items = items + 1
    survived = survived + 1
  end)

  it("drains: a second signal cancels the items in flight at once", function()
    local m = F.machines(admin, 1, 1)[1]
    local h = host("drain3", "600", { "--grace", "600" })
    h:await("stdout", "running " .. m, 30)
    h:kill("TERM")
    h:await("stderr", "draining", 30)
    h:kill("INT")
    faults = faults + 2
    assert.equal(0, h:wait(90), h:stderr())
    assert.same({ "Started", "Canceled" }, events(m))
    assert.equal(0, admin:count("SELECT 1 FROM work"))
    assert.equal(0, admin:count("SELECT 1 FROM sessions WHERE component_name = 'fault'"))
    admin:exec("DELETE FROM passes WHERE machine_id = $1", m)
    items = items + 1
    survived = survived + 2
  end)
end)
