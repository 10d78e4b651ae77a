-- Fault suite, guarantee 6 across servers: a primary with a synchronous
-- streaming standby; hosts use a multi-host DSN (target_session_attrs =
-- read-write). The primary dies while items run and the standby is
-- promoted: the hosts reconnect to the new primary and carry on, and no
-- item whose finish returned is missing there.
local H = require "support.helpers"
local F = require "support.faults"

describe("fault: failover to a promoted standby #slow", function()
  it("carries on against the promoted standby and loses no finished item", function()
    local primary, standby = H.standby_pair { sync = true }
    local dbname = primary:create_db():match("dbname=(%S+)")
    local dsn, admin = F.prepare(H.multi_dsn({ primary, standby }, dbname))
    local dir = H.tmpdir("fault-failover")
    H.write_file(dir .. "/fault.lua", F.script())
    F.machines(admin, 30, 1000000)
    local hosts = {}
    for i = 1, 2 do
      hosts[i] = F.host(dsn, "fo" .. i, dir .. "/fault.lua", { env = { CONC = "4", HOLD = "0.1" } })
      hosts[i]:await("stderr", "workers started", 30)
    end
    local function progress(what)
      local before = admin:count("SELECT 1 FROM intervals")
      H.wait_until(function() return admin:count("SELECT 1 FROM intervals") >= before + 16 end, 180,
        "work to go on " .. what)
      for _, h in ipairs(hosts) do assert.is_true(h:running(), h:stderr()) end
    end
    progress("before the failover")

    primary:stop("immediate")
    standby:promote()
    progress("on the promoted standby")
    assert.equal("f", standby:psql(standby:dsn(dbname), "SELECT pg_is_in_recovery()"))

    admin:exec("UPDATE passes SET target = n + 2")
    F.wait_complete(admin, hosts, 180)
    for _, h in ipairs(hosts) do h:kill("TERM") end
    for _, h in ipairs(hosts) do assert.equal(0, h:wait(60), h:stderr()) end
    local committed = {}
    for _, h in ipairs(hosts) do F.committed(h, committed) end
    local a = F.audit(admin, committed, true)
    F.figures("failover", { items = a.items, faults = 1, survived = (a.lost == 0 and a.overlaps == 0) and 1 or 0,
      lost = a.lost, overlaps = a.overlaps + a.twice })
    print(string.format("\n  %d items, %d reported committed, across a failover", a.items, #committed))
    F.assert_clean(admin, committed, true)
    admin:close()
    standby:stop()
  end)
end)
