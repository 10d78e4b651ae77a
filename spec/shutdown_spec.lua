-- Ending the host in order: os.exit in a script, bodies that ignore the
-- cancel, a route to the database that hangs.
local H = require "support.helpers"
local core = require "bmdb.core"

describe("shutdown", function()
  local dsn, admin, dir

  local function script(name, src)
    local path = dir .. "/" .. name
    H.write_file(path, src)
    return path
  end

  local function start(args, path, to)
    local argv = { H.bin, "--interval", "2" }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    argv[#argv + 1] = path
    return H.spawn { argv = argv, env = { BMDB_DSN = to or dsn } }
  end

  -- A worker whose body is src, over the machines in the table `wanted`.
  local function worker(name, src)
    return script(name, [[
      local bmdb = require "bmdb"
      return { bmdb.worker {
        process = "Stop", poll = 0.1,
        select = function(tx, limit)
          return tx:query([=[SELECT machine_id FROM wanted w WHERE NOT EXISTS
            (SELECT 1 FROM work_blocked b WHERE b.machine_id = w.machine_id AND b.process = 'Stop') LIMIT $1]=], limit)
        end,
        run = function(w)
          io.stdout:write("holding ", w.machine, " ", w.session_id, "\n"); io.stdout:flush()
          ]] .. src .. [[
        end,
      } }
    ]])
  end

  local function want()
    local m = admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
    admin:exec("INSERT INTO wanted VALUES ($1)", m)
    return m
  end

  local function history(m) return H.events(admin, m) end

  -- The session ended in order: its row is deleted, and the lock it held
  -- on m is released and recorded Canceled.
  -- event: how the item ended (a body that called os.exit failed it:
  -- a poison pill backs off).
  local function ended_in_order(session, m, event)
    assert.equal(0, admin:one("SELECT count(*) AS n FROM sessions WHERE session_id = $1", session).n)
    assert.equal(0, admin:one("SELECT count(*) AS n FROM work WHERE machine_id = $1", m).n)
    assert.same({ "Started", event or "Canceled" }, history(m))
  end

  setup(function()
    dsn = H.postgres():create_db()
    assert.equal(0, (H.run({ H.bin, "migrate" }, { env = { BMDB_DSN = dsn } })))
    admin = core.connect(dsn)
    admin:exec("CREATE TABLE wanted (machine_id UUID PRIMARY KEY REFERENCES machines)")
    dir = H.tmpdir("shutdown")
  end)

  teardown(function() admin:close() end)
  before_each(function() admin:exec("DELETE FROM wanted") end)

  it("os.exit in a worker's body ends the session, records the item Failed, and exits with its status", function()
    local m = want()
    local p = start({}, worker("exit.lua", "os.exit(3)"))
    local session = H.wait_until(function() return p:stdout():match("holding %S+ (%S+)") end, 20, "the item")
    assert.equal(3, p:wait(20), p:stderr())
    ended_in_order(session, m, "Failed")
    assert.matches("os.exit called: stopping the host", p:stderr(), 1, true)
  end)

  it("os.exit in a one-off's body does the same", function()
    local m = admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
    local s = script("exit1.lua", [[
      require("bmdb").work(arg[1], "Stop", function(w)
        io.stdout:write("holding ", w.machine, " ", w.session_id, "\n"); io.stdout:flush()
        os.exit(5)
      end)
    ]])
    local p = H.spawn { argv = { H.bin, s, m }, env = { BMDB_DSN = dsn } }
    assert.equal(5, p:wait(20), p:stderr())
    ended_in_order(p:stdout():match("holding %S+ (%S+)"), m, "Failed")
  end)

  it("a body looping in JIT-compiled code is left behind: the session ends in order and the host exits 4", function()
    local m = want()
    local p = start({ "--grace", "1" }, worker("spin.lua", "while true do end"))
    local session = H.wait_until(function() return p:stdout():match("holding %S+ (%S+)") end, 20, "the item")
    p:kill("TERM")
    -- grace (1 s) + the stop wait (10 s), with room for a loaded machine
    assert.equal(4, p:wait(30), p:stderr())
    assert.matches('slot did not stop; left behind (a loop compiled by the JIT ignores the interrupt)" process=Stop slot=1 machine=' .. m,
      p:stderr(), 1, true)
    ended_in_order(session, m)
  end)

  -- The route to the database hangs: every connection through the relay,
  -- and every new one, waits for ever (SIGSTOP of the relay: connecting
  -- still succeeds, into its listen queue). The heartbeat's statement runs
  -- out of time; its cancel request, which libpq sends blocking, hangs on
  -- the same route, and so does its connect (up to connect_timeout, longer
  -- than the interval). Neither may hold the local give-up past the
  -- database's deadline (guarantee 3), nor keep the host from exiting.
  it("gives the session up on time and exits when the route to the database hangs", function()
    local m = want()
    local relay = H.relay(dsn)
    local p = start({ "--grace", "1" }, worker("hang.lua", "bmdb.sleep(600)"), relay.dsn)
    local session = H.wait_until(function() return p:stdout():match("holding %S+ (%S+)") end, 20, "the item")
    assert.is_true(relay.freeze())
    local ok, err = pcall(p.await, p, "stderr", 'msg="session lost"', 30)
    if ok then
      p:kill("TERM")
      -- grace (1 s), the stop wait (10 s) and a connect timeout (10 s)
      ok, err = pcall(p.wait, p, 60)
    end
    relay.thaw()
    assert(ok, tostring(err) .. "\n" .. p:stderr())
    local lost_at = p:stderr():match('time=(%S+) level=warn msg="session lost" session=' .. session:gsub("%-", "%%-"))
    assert.is_not_nil(lost_at, p:stderr())
    -- the log's time is cut to the millisecond: add one before comparing
    assert.is_true(admin:one([[SELECT $1::TIMESTAMPTZ + INTERVAL '1 millisecond' < deadline AS first
                               FROM sessions WHERE session_id = $2]], lost_at, session).first, p:stderr())
    assert.equal(0, p.code, p:stderr())
    assert.same({ "Started" }, history(m))
  end)

  -- A body's statement is in flight when the route hangs: libpq waits on
  -- its socket with no bound, and no hook or wake-up reaches it there.
  -- Once the session is lost, nothing of it can commit, and the host cuts
  -- the connections its transactions hold (shutdown of their sockets): the
  -- body gets its error, and the slot is free. Once the route is back, a
  -- new session takes the item over and runs it.
  it("frees a body whose statement hangs on the route, and runs the item once the route is back", function()
    local m = want()
    local relay = H.relay(dsn)
    local p = start({}, worker("stuck.lua", [[
      if w.attempt == 1 then
        while true do bmdb.transact(function(tx) tx:exec("SELECT pg_sleep(0.01)") end) end
      end
      w:finish(function(tx) tx:exec("DELETE FROM wanted WHERE machine_id = $1", w.machine) end)
    ]]), relay.dsn)
    H.wait_until(function() return p:stdout():match("holding %S+ (%S+)") end, 20, "the item")
    assert.is_true(relay.freeze())
    local ok, err = pcall(p.await, p, "stderr", 'msg="work lost"', 15)
    relay.thaw()
    assert(ok, err)
    local back, why = pcall(H.wait_until, function()
      return not admin:one("SELECT 1 AS x FROM wanted WHERE machine_id = $1", m)
    end, 60, "the item, run again once the route is back")
    assert(back, tostring(why) .. "\n" .. p:stderr())
    assert.same({ "Started", "Abandoned", "Started", "Finished" }, history(m))
    p:kill("TERM")
    assert.equal(0, p:wait(30), p:stderr())
  end)
end)
