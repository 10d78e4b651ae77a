-- Fault suite, guarantee 6: database faults while items run. The server
-- process behind each of the host's connections is terminated (heartbeat,
-- listener, a slot mid-transaction), the server restarts with -m
-- immediate, and it stays down for three intervals. The host survives,
-- works on (with a new session when the old one could not be kept),
-- nothing is held twice, no row it reported committed is lost, and it
-- never holds more connections than its pool (8).
local H = require "support.helpers"
local F = require "support.faults"

describe("fault: database faults while items run", function()
  local server, dsn, admin, dir

  setup(function()
    server = F.durable_server()
    dsn, admin = F.database(server)
    dir = H.tmpdir("fault-db")
    -- every body also runs a transaction that takes a while, so a slot can
    -- be caught inside one
    H.write_file(dir .. "/fault.lua", F.script {
      body = [[bmdb.transact(function(tx) tx:exec("SELECT pg_sleep(0.1)") end)]] })
  end)

  teardown(function()
    admin:close()
    server:stop()
  end)

  it("survives terminated connections, an immediate restart and an outage without losing or doubling work", function()
    F.machines(admin, 60, 1000000)
    local h = F.host(dsn, "dbA", dir .. "/fault.lua", { env = { CONC = "6", HOLD = "0.1", FAIL = "0.02" } })
    h:await("stderr", "workers started", 30)
    local faults, survived, max_conns = 0, 0, 0

    local function conns()
      local n = admin:count("SELECT 1 FROM pg_stat_activity WHERE application_name = 'dbA'")
      if n > max_conns then max_conns = n end
      return n
    end
    -- progress: n more items finish after the fault
    local function progress(what)
      local before = admin:count("SELECT 1 FROM intervals")
      local ok, err = pcall(H.wait_until, function() conns(); return admin:count("SELECT 1 FROM intervals") >= before + 8 end,
        120, "work to go on after " .. what)
      if not ok then error(err .. "\n" .. h:stderr():sub(-3000), 0) end
      assert.is_true(h:running(), "the host exited after " .. what .. ":\n" .. h:stderr())
      assert.is_true(conns() <= 9, "more connections than the pool holds after " .. what)
      if what ~= "start" then survived = survived + 1 end
    end
    local function backend(what, pred)
      return H.wait_until(function()
        for _, b in ipairs(H.backends(admin, "dbA")) do
          if pred(b) then return b.pid end
        end
      end, 30, "the host's " .. what .. " connection", 0.005)
    end
    local function session()
      return H.wait_until(function()
        local sid = select(3, h:stderr():find('.*msg="session started" session=(%S+)'))
        return sid and admin:one("SELECT deadline::TEXT AS d FROM sessions WHERE session_id = $1", sid) and sid
      end, 60, "the host's current session")
    end
    -- a single failed connection is a transient error: the session survives
    local function kept(sid, what)
      local d = admin:one("SELECT deadline::TEXT AS d FROM sessions WHERE session_id = $1", sid).d
      H.wait_until(function()
        local r = admin:one("SELECT deadline > $2::TIMESTAMPTZ AS later FROM sessions WHERE session_id = $1", sid, d)
        return r and r.later
      end, 30, "the heartbeat to keep session " .. sid .. " after " .. what)
    end
    progress("start")

    -- the heartbeat's connection
    local sid = session()
    local pid = backend("heartbeat", function(b) return b.query:match("^UPDATE sessions SET deadline") end)
    assert.is_true(H.terminate_backend(admin, pid))
    faults = faults + 1
    kept(sid, "its connection was terminated")
    progress("the heartbeat's connection was terminated")

    -- the listener's
    sid = session()
    -- its last statement: the LISTEN, or a coalesced wake-up it sent since
    pid = backend("listener", function(b)
      return b.query:match("^LISTEN bmdb_wake") or b.query == "SELECT pg_notify('bmdb_wake', '')"
    end)
    assert.is_true(H.terminate_backend(admin, pid))
    faults = faults + 1
    h:await("stderr", "listener connection lost", 30)
    progress("the listener's connection was terminated")

    -- a slot's, inside a transaction
    pid = backend("slot", function(b) return b.state == "active" and b.query:match("pg_sleep") end)
    assert.is_true(H.terminate_backend(admin, pid))
    faults = faults + 1
    progress("a slot's connection was terminated mid-transaction")
    kept(sid, "the listener's and a slot's connections were terminated")

    -- pg_ctl restart -m immediate
    server:stop("immediate")
    server:start()
    faults = faults + 1
    progress("an immediate restart")

    -- the server down for three intervals
    server:stop("fast")
    H.sleep(6) -- the outage itself
    server:start()
    faults = faults + 1
    H.wait_until(function() return F.count_lines(h, 'msg="session started"') >= 2 end, 60, "a new session after the outage")
    progress("an outage of three intervals")

    -- finish: every machine a few more times, then stop
    admin:exec("UPDATE passes SET target = n + 3")
    F.wait_complete(admin, { h }, 180)
    h:kill("TERM")
    assert.equal(0, h:wait(60), h:stderr())
    H.wait_until(function() return conns() == 0 end, 30, "the host's connections to close")
    local a = F.audit(admin, F.committed(h), true)
    F.figures("database faults", { items = a.items, faults = faults, survived = survived, lost = a.lost,
      overlaps = a.overlaps + a.twice })
    print(string.format("\n  %d items through %d database faults; at most %d connections", a.items, faults, max_conns))
    F.assert_clean(admin, F.committed(h), true)
    -- 6 slots, the retention loop, the heartbeat and the listener
    assert.is_true(max_conns <= 9, max_conns .. " connections at once, at most 9 are the host's")
    assert.equal(0, admin:count("SELECT 1 FROM work"))
  end)
end)
