-- Fault suite, guarantees 2, 3 and 9 (fencing): a host frozen inside an
-- item, a host whose server process hangs, and a COMMIT that stalls while
-- another host takes the machine over. The server records commit
-- timestamps, so the spec can tell whether the old holder committed
-- anything after the new holder's claim committed: it must not.
local H = require "support.helpers"
local F = require "support.faults"

local script = [[
local bmdb = require "bmdb"
local ROLE, GO = os.getenv("ROLE"), os.getenv("GO")
local function say(...) io.stdout:write(...); io.stdout:write("\n"); io.stdout:flush() end
local function zombie_row(tx, w, n)
  tx:exec("INSERT INTO zombie_writes VALUES ($1, $2, $3, $4)", w.machine, w.session_id, ROLE, n)
end
return {
  bmdb.worker {
    process = "Zombie", poll = 0.2,
    select = function(tx, limit)
      return tx:query([=[SELECT m.machine_id FROM machines m WHERE m.machine_id = $2
        AND NOT EXISTS (SELECT 1 FROM work_history h WHERE h.machine_id = m.machine_id
                        AND h.process = 'Zombie' AND h.event = 'Finished')
        AND NOT EXISTS (SELECT 1 FROM work_blocked b WHERE b.machine_id = m.machine_id
                        AND b.process = 'Zombie') LIMIT $1]=], limit, os.getenv("MACHINE"))
    end,
    run = function(w)
      say("running ", w.session_id)
      if ROLE == "writer" then
        -- writes until the host refuses, then tries to finish with a write
        for i = 1, math.huge do
          local ok, err = pcall(bmdb.transact, function(tx) zombie_row(tx, w, i) end)
          if not ok then say("write refused: ", tostring(err)); break end
          say("wrote ", i)
          pcall(bmdb.sleep, 0.1)
        end
        w:finish(function(tx) zombie_row(tx, w, -1) end)
        say("zombie finished")
      elseif ROLE == "stall" then
        -- a body's own write whose COMMIT stalls (it does not touch the
        -- work row, so nothing but the fence orders it against a takeover)
        while not io.open(GO) do bmdb.sleep(0.05) end
        local ok, err = pcall(bmdb.transact, function(tx)
          tx:exec("INSERT INTO slow_rows VALUES ($1, $2, $3)", w.machine, w.session_id, ROLE)
        end)
        say("stalled write: ", tostring(ok), " ", tostring(err))
        w:finish()
      elseif ROLE == "stall-taker" then
        w:finish(function(tx)
          tx:exec("INSERT INTO slow_rows VALUES ($1, $2, $3)", w.machine, w.session_id, ROLE)
        end)
      else
        w:finish(function(tx) zombie_row(tx, w, 0) end)
      end
    end,
  },
}
]]

describe("fault: fencing", function()
  local server, dsn, admin, dir
  local faults, survived, items, late = 0, 0, 0, 0

  setup(function()
    server = H.postgres { fresh = true }
    server:psql(server:dsn(), "ALTER SYSTEM SET track_commit_timestamp = on")
    server:restart()
    dsn, admin = F.database(server)
    dir = H.tmpdir("fault-fence")
    H.write_file(dir .. "/zombie.lua", script)
    admin:exec("CREATE TABLE zombie_writes (machine_id UUID, session_id UUID, role TEXT, n INT8)")
    admin:exec("CREATE TABLE slow_rows (machine_id UUID, session_id UUID, role TEXT)")
    -- A deferred constraint trigger that sleeps makes every COMMIT that
    -- wrote slow_rows take a second (a spec's own table; not the schema).
    server:psql(dsn, [[CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS
      $f$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $f$;
      CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON slow_rows
      DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();]])
  end)

  teardown(function()
    F.figures("fencing", { items = items, faults = faults, survived = survived, overlaps = late })
    admin:close()
    server:stop()
  end)

  local function machine()
    return admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
  end

  -- Each host connects as its own database user (a superuser named after
  -- it), so a fault can refuse its new connections while its existing ones
  -- hang: a host cut off from the server, not one that sees errors.
  local function host(name, role, m, extra)
    local env = { ROLE = role, MACHINE = m }
    for k, v in pairs(extra or {}) do env[k] = v end
    local user = name:lower()
    if not admin:one("SELECT 1 AS x FROM pg_roles WHERE rolname = $1", user) then
      server:psql(dsn, "CREATE ROLE " .. user .. " LOGIN SUPERUSER")
    end
    local h = F.host(dsn .. " user=" .. user, name, dir .. "/zombie.lua", { env = env })
    h:await("stderr", "workers started", 30)
    return h
  end

  local function session_of(h)
    return H.wait_until(function() return h:stdout():match("running (%S+)") end, 30, h.name .. " to run the item")
  end

  local function signal_backends(name, sig)
    local n = 0
    for _, b in ipairs(H.backends(admin, name)) do
      if H.signal(b.pid, sig) then n = n + 1 end
    end
    return n
  end

  -- The host's server processes stop (its connections hang) and it cannot
  -- open new ones; thaw undoes both.
  local function freeze(name)
    server:psql(dsn, "ALTER ROLE " .. name:lower() .. " NOLOGIN")
    return signal_backends(name, "STOP")
  end

  local function thaw(name)
    server:psql(dsn, "ALTER ROLE " .. name:lower() .. " LOGIN")
    return signal_backends(name, "CONT")
  end

  -- The old holder's session is past its deadline in the database, and the
  -- taker has either claimed the machine or waits for a lock the old
  -- holder's transaction holds (a takeover that conflicts with it).
  local function wait_takeover(m, old, taker)
    H.wait_until(function()
      local s = admin:one("SELECT deadline > now() AS live FROM sessions WHERE session_id = $1", old)
      if s and s.live then return false end
      if admin:one([[SELECT 1 AS x FROM work_history WHERE machine_id = $1 AND event = 'Started'
                     AND session_id <> $2]], m, old) then return true end
      for _, b in ipairs(H.backends(admin, taker)) do
        if b.wait_event_type == "Lock" then return true end
      end
    end, 60, "the old session to expire and the machine to be taken over")
  end

  -- Nothing of the old session committed after the new holder's claim did.
  local function late_commits(m, old)
    local claim = admin:one([[SELECT pg_xact_commit_timestamp(xmin)::TEXT AS t FROM work_history
      WHERE machine_id = $1 AND event = 'Started' AND session_id <> $2]], m, old)
    if not claim then return 0 end
    return admin:count([[SELECT 1 FROM zombie_writes WHERE session_id = $1
      AND pg_xact_commit_timestamp(xmin) >= $2::TIMESTAMPTZ]], old, claim.t)
      + admin:count([[SELECT 1 FROM slow_rows WHERE session_id = $1
      AND pg_xact_commit_timestamp(xmin) >= $2::TIMESTAMPTZ]], old, claim.t)
  end

  local function settled(m)
    H.wait_until(function()
      return admin:count("SELECT 1 FROM work WHERE machine_id = $1", m) == 0
        and admin:count("SELECT 1 FROM work_history WHERE machine_id = $1 AND event = 'Finished'", m) >= 1
    end, 60, "the machine to be finished and released")
  end

  local function stop(...)
    for _, h in ipairs { ... } do h:kill("TERM") end
    for _, h in ipairs { ... } do assert.equal(0, h:wait(60), h:stderr()) end
  end

  it("commits nothing from a host frozen (SIGSTOP) inside an item past its interval", function()
    local m = machine()
    local a = host("frozenA", "writer", m)
    local old = session_of(a)
    a:await("stdout", "wrote 2", 30)
    local b = host("takerB", "taker", m)
    a:kill("STOP")
    faults = faults + 1
    wait_takeover(m, old, "takerB")
    a:kill("CONT")
    settled(m)
    a:await("stdout", "write refused", 30)
    a:await("stderr", 'msg="session lost"', 30)
    a:await("stderr", 'msg="work lost"', 30)
    H.wait_until(function() return F.count_lines(a, 'msg="session started"') >= 2 end, 30, "a new session")
    stop(a, b)
    items = items + 1
    late = late + late_commits(m, old)
    assert.equal(0, late_commits(m, old))
    assert.equal(0, admin:count("SELECT 1 FROM zombie_writes WHERE session_id = $1 AND n = -1", old))
    assert.equal(0, admin:count("SELECT 1 FROM work_history WHERE session_id = $1 AND event = 'Finished'", old))
    assert.equal(1, admin:count("SELECT 1 FROM work_history WHERE machine_id = $1 AND event = 'Finished' AND session_id <> $2", m, old))
    assert.not_matches("zombie finished", a:stdout(), 1, true)
    assert.equal(0, F.audit(admin).overlaps)
    survived = survived + 1
  end)

  it("commits nothing from a host whose server process hangs (SIGSTOP of its backends)", function()
    local m = machine()
    local a = host("hungA", "writer", m)
    local old = session_of(a)
    a:await("stdout", "wrote 2", 30)
    local b = host("takerB2", "taker", m)
    assert.is_true(freeze("hungA") >= 2, "the host's heartbeat and slot connections")
    faults = faults + 1
    a:await("stderr", 'msg="session lost"', 30)
    wait_takeover(m, old, "takerB2")
    thaw("hungA")
    settled(m)
    H.wait_until(function() return F.count_lines(a, 'msg="session started"') >= 2 end, 60, "a new session")
    assert.is_true(a:running())
    stop(a, b)
    items = items + 1
    late = late + late_commits(m, old)
    assert.equal(0, late_commits(m, old))
    assert.equal(0, admin:count("SELECT 1 FROM work_history WHERE session_id = $1 AND event = 'Finished'", old))
    assert.equal(1, admin:count("SELECT 1 FROM work_history WHERE machine_id = $1 AND event = 'Finished' AND session_id <> $2", m, old))
    assert.equal(0, F.audit(admin).overlaps)
    survived = survived + 1
  end)

  -- A COMMIT that stalls (here a deferred trigger that
  -- sleeps, then the host's server processes stopped) must not land after
  -- a takeover: either the old holder's commit or the new holder's, never
  -- both.
  it("never commits both holders' rows when a COMMIT stalls during a takeover", function()
    local m = machine()
    local go = dir .. "/go"
    local a = host("stallA", "stall", m, { GO = go })
    local old = session_of(a)
    local b = host("stallB", "stall-taker", m)
    H.write_file(go, "")
    local pid = H.wait_until(function()
      for _, r in ipairs(H.backends(admin, "stallA")) do
        if r.state == "active" and r.query == "COMMIT" then return r.pid end
      end
    end, 30, "stallA's COMMIT to be in flight", 0.005)
    H.signal(pid, "STOP")
    freeze("stallA")
    faults = faults + 1
    wait_takeover(m, old, "stallB")
    thaw("stallA")
    H.signal(pid, "CONT")
    settled(m)
    H.wait_until(function() return not admin:one("SELECT 1 AS x FROM pg_stat_activity WHERE query = 'COMMIT' AND state = 'active'") end,
      30, "every COMMIT to end")
    stop(a, b)
    -- the takeover happened, and the stalled write either committed
    -- before it or not at all
    assert.equal(1, admin:count("SELECT 1 FROM work_history WHERE machine_id = $1 AND event = 'Started' AND session_id <> $2", m, old))
    assert.equal(1, admin:count("SELECT 1 FROM work_history WHERE machine_id = $1 AND event = 'Finished'", m))
    items = items + 1
    late = late + late_commits(m, old)
    assert.equal(0, late_commits(m, old), "stallA's stalled write committed after stallB's claim")
    assert.equal(0, F.audit(admin).overlaps)
    survived = survived + 1
  end)

  -- Guarantee 3: with its server process hung, the host gives the session
  -- up on its own clock before the database's deadline passes.
  it("gives the session up locally before the database's deadline", function()
    local m = machine()
    local a = host("localA", "writer", m)
    local sid = session_of(a)
    a:await("stdout", "wrote 2", 30)
    freeze("localA")
    faults = faults + 1
    a:await("stderr", 'msg="session lost"', 30)
    local line = a:stderr():match('[^\n]*msg="session lost" session=' .. sid:gsub("%-", "%%-") .. '[^\n]*')
    assert.is_not_nil(line, a:stderr())
    local lost_at = line:match("^time=(%S+)")
    local db = admin:one("SELECT deadline::TEXT AS d FROM sessions WHERE session_id = $1", sid)
    assert.is_not_nil(db, "the session row is still there while the host's server processes are stopped")
    -- the log's time is cut to the millisecond: add one before comparing
    local r = admin:one([[SELECT $1::TIMESTAMPTZ + INTERVAL '1 millisecond' < $2::TIMESTAMPTZ AS first,
                                 extract(epoch FROM $2::TIMESTAMPTZ - $1::TIMESTAMPTZ)::TEXT AS ahead]], lost_at, db.d)
    print(string.format("\n  local give-up %ss before the database's deadline (interval 2s)", r.ahead))
    assert.is_true(r.first, "local give-up at " .. lost_at .. ", database deadline " .. db.d)
    thaw("localA")
    H.wait_until(function() return F.count_lines(a, 'msg="session started"') >= 2 end, 60, "a new session")
    stop(a)
    items = items + 1
    survived = survived + 1
  end)
end)
