-- Fault suite: a database outage is not the items' fault (docs/work-control.md,
-- the poison-pill rule). Items in flight across an immediate restart that
-- outlasts the interval lose their session: they are recorded Abandoned
-- with a cause that says the database went away, get no backoff and run
-- again at once. A host killed with SIGKILL while the database runs still
-- counts against its items: Abandoned, "session expired", backoff. A
-- standby promoted after a primary's crash is the same outage as a
-- restart (its server started long before: the rule reads the last
-- commit it replayed).
local H = require "support.helpers"
local F = require "support.faults"

local SCRIPT = [[
local bmdb = require "bmdb"
return {
  bmdb.worker {
    process = "Out", concurrency = 8, poll = 0.2,
    -- a backoff long enough that an item run again soon was not put in it
    backoff = { initial = 600 },
    select = function(tx, limit)
      return tx:query([=[SELECT m.machine_id FROM machines m WHERE NOT EXISTS (SELECT 1 FROM work_blocked b
        WHERE b.machine_id = m.machine_id AND b.process = 'Out') LIMIT $1]=], limit)
    end,
    run = function(w)
      bmdb.sleep(tonumber(os.getenv("HOLD")))
      w:finish()
    end,
  },
}
]]

describe("fault: a database outage is not the items' fault", function()
  local server, dsn, admin, dir

  setup(function()
    server = F.durable_server()
    dsn, admin = F.database(server)
    dir = H.tmpdir("fault-outage-items")
    H.write_file(dir .. "/out.lua", SCRIPT)
  end)

  teardown(function()
    admin:close()
    server:stop()
  end)

  before_each(function()
    admin:exec("DELETE FROM work_history")
    admin:exec("DELETE FROM work_backoff")
    admin:exec("DELETE FROM machines")
    for _ = 1, 4 do admin:exec("INSERT INTO machines DEFAULT VALUES") end
  end)

  -- every machine held by one live session of the host
  local function all_in_flight()
    H.wait_until(function() return admin:count("SELECT 1 FROM work WHERE process = 'Out'") == 4 end, 30,
      "the four machines to be in flight")
    return admin:query("SELECT machine_id, session_id FROM work WHERE process = 'Out'")
  end

  it("an immediate restart longer than the interval: Abandoned, not counted, run again at once", function()
    local h = F.host(dsn, "outA", dir .. "/out.lua", { interval = 2, env = { HOLD = "30" } })
    finally(function() h:kill("KILL"); h:wait(30) end)
    h:await("stderr", "workers started", 30)
    local held = all_in_flight()
    server:stop("immediate")
    H.sleep(5) -- the outage itself: longer than the interval (2 s)
    server:start()
    local ok, err = pcall(H.wait_until, function()
      return admin:count([[SELECT 1 FROM work_history h WHERE h.process = 'Out' AND h.event = 'Abandoned'
        AND h.session_id = $1]], held[1].session_id) == 4
    end, 60, "the lost session's four items to be recorded Abandoned")
    if not ok then error(err .. "\n" .. F.log_tail(h), 0) end
    local causes = admin:query([[SELECT DISTINCT cause FROM work_history
      WHERE process = 'Out' AND event = 'Abandoned']])
    assert.same({ { cause = "session expired (database restarted or failed over: not counted)" } }, causes)
    assert.equal(0, admin:count("SELECT 1 FROM work_backoff WHERE process = 'Out'"))
    -- each runs again (within the backoff it would have had, 600 s)
    for _, r in ipairs(held) do
      H.wait_until(function()
        return admin:count([[SELECT 1 FROM work_history WHERE machine_id = $1 AND process = 'Out'
          AND event = 'Started' AND session_id <> $2]], r.machine_id, r.session_id) == 1
      end, 60, "machine " .. r.machine_id .. " to run again")
    end
    assert.equal(0, admin:count("SELECT 1 FROM work_backoff WHERE process = 'Out'"))
  end)

  it("a host killed while the database runs still counts: Abandoned, backoff", function()
    local h = F.host(dsn, "outB", dir .. "/out.lua", { interval = 2, env = { HOLD = "30" } })
    h:await("stderr", "workers started", 30)
    local held = all_in_flight()
    h:kill("KILL")
    h:wait(30)
    -- another host collects the expired session
    local h2 = F.host(dsn, "outC", dir .. "/out.lua", { interval = 2, env = { HOLD = "30" } })
    finally(function() h2:kill("KILL"); h2:wait(30) end)
    local ok, err = pcall(H.wait_until, function()
      return admin:count([[SELECT 1 FROM work_history WHERE process = 'Out' AND event = 'Abandoned'
        AND session_id = $1]], held[1].session_id) == 4
    end, 60, "the killed host's four items to be recorded Abandoned")
    if not ok then error(err .. "\n" .. F.log_tail(h2), 0) end
    assert.same({ { cause = "session expired" } },
      admin:query("SELECT DISTINCT cause FROM work_history WHERE process = 'Out' AND event = 'Abandoned'"))
    assert.equal(4, admin:count([[SELECT 1 FROM work_backoff WHERE process = 'Out' AND attempts = 1
      AND backoff_until > now() + INTERVAL '500 seconds']]))
    assert.equal(0, admin:count([[SELECT 1 FROM work_history WHERE process = 'Out' AND event = 'Started'
      AND session_id <> $1]], held[1].session_id))
  end)

  it("a standby promoted after the primary's crash, the outage longer than the interval: not counted", function()
    local primary, standby = H.standby_pair { sync = true }
    local db = primary:create_db():match("dbname=(%S+)")
    local mdsn = H.multi_dsn({ primary, standby }, db)
    local _, padmin = F.prepare(mdsn)
    finally(function() padmin:close() end)
    for _ = 1, 4 do padmin:exec("INSERT INTO machines DEFAULT VALUES") end
    local h = F.host(mdsn .. " connect_timeout=2", "outD", dir .. "/out.lua", { interval = 2, env = { HOLD = "30" } })
    finally(function() h:kill("KILL"); h:wait(30) end)
    h:await("stderr", "workers started", 30)
    H.wait_until(function() return padmin:count("SELECT 1 FROM work WHERE process = 'Out'") == 4 end, 30,
      "the four machines to be in flight")
    local sid = padmin:one("SELECT session_id FROM work LIMIT 1").session_id
    primary:stop("immediate")
    H.sleep(5) -- the outage itself: longer than the interval (2 s)
    standby:promote()
    local ok, err = pcall(H.wait_until, function()
      return padmin:count([[SELECT 1 FROM work_history WHERE process = 'Out' AND event = 'Abandoned'
        AND session_id = $1]], sid) == 4
    end, 60, "the lost session's four items to be recorded Abandoned on the promoted standby")
    if not ok then error(err .. "\n" .. F.log_tail(h), 0) end
    assert.same({ { cause = "session expired (database restarted or failed over: not counted)" } },
      padmin:query("SELECT DISTINCT cause FROM work_history WHERE process = 'Out' AND event = 'Abandoned'"))
    assert.equal(0, padmin:count("SELECT 1 FROM work_backoff WHERE process = 'Out'"))
    H.wait_until(function()
      return padmin:count([[SELECT DISTINCT machine_id FROM work_history WHERE process = 'Out'
        AND event = 'Started' AND session_id <> $1]], sid) == 4
    end, 60, "the four machines to run again")
  end)

  -- CockroachDB has no pg_postmaster_start_time(): a database whose
  -- search_path finds one that fails as an unknown function stands in
  it("where the server cannot say when it started, every expired session counts, said once", function()
    local cdsn, cadmin = F.database(server)
    finally(function() cadmin:close() end)
    local db = cdsn:match("dbname=(%S+)")
    cadmin:exec([[CREATE FUNCTION public.pg_postmaster_start_time() RETURNS TIMESTAMPTZ LANGUAGE plpgsql AS
      $f$ BEGIN RAISE EXCEPTION 'unknown function: pg_postmaster_start_time()' USING ERRCODE = '42883'; END $f$]])
    cadmin:exec("ALTER DATABASE " .. db .. " SET search_path = public, pg_catalog")
    for _ = 1, 4 do cadmin:exec("INSERT INTO machines DEFAULT VALUES") end
    local h = F.host(cdsn, "outE", dir .. "/out.lua", { interval = 2, env = { HOLD = "30" } })
    finally(function() h:kill("KILL"); h:wait(30) end)
    h:await("stderr", "workers started", 30)
    H.wait_until(function() return cadmin:count("SELECT 1 FROM work WHERE process = 'Out'") == 4 end, 30,
      "the four machines to be in flight")
    local sid = cadmin:one("SELECT session_id FROM work LIMIT 1").session_id
    h:kill("KILL")
    h:wait(30)
    local h2 = F.host(cdsn, "outF", dir .. "/out.lua", { interval = 2, env = { HOLD = "30" } })
    finally(function() h2:kill("KILL"); h2:wait(30) end)
    local ok, err = pcall(H.wait_until, function()
      return cadmin:count([[SELECT 1 FROM work_history WHERE process = 'Out' AND event = 'Abandoned'
        AND session_id = $1]], sid) == 4
    end, 60, "the killed host's four items to be recorded Abandoned")
    if not ok then error(err .. "\n" .. F.log_tail(h2), 0) end
    assert.same({ { cause = "session expired" } },
      cadmin:query("SELECT DISTINCT cause FROM work_history WHERE process = 'Out' AND event = 'Abandoned'"))
    assert.equal(4, cadmin:count("SELECT 1 FROM work_backoff WHERE process = 'Out' AND attempts = 1"))
    assert.equal(1, F.count_lines(h2, "the server cannot say when it started"))
  end)
end)
