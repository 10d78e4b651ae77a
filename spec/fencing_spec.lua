-- Fencing and liveness under faults: each case is a defect a review or an
-- adversarial run found, reproduced
-- against a real PostgreSQL and real hosts.
local H = require "support.helpers"
local bmdb = require "bmdb"
local core = require "bmdb.core"

local function new_machine(admin)
  return admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
end

-- The backend of this database whose last statement starts with prefix.
local function backend_running(admin, prefix)
  local r = admin:one([[SELECT pid FROM pg_stat_activity
                        WHERE datname = current_database() AND pid <> pg_backend_pid()
                          AND starts_with(query, $1) LIMIT 1]], prefix)
  return r and r.pid
end

describe("fencing and liveness", function()
  local dsn, admin, dir

  setup(function()
    dsn, admin = H.open_core("fencing_spec")
    dir = H.tmpdir("fencing")
  end)

  teardown(function()
    core.pause_heartbeat(false)
    H.close_core(admin)
  end)

  after_each(function() core.pause_heartbeat(false) end)

  it("keeps its session when the heartbeat's connection is terminated, three times over", function()
    local id = bmdb.session().id
    for _ = 1, 3 do
      local pid = H.wait_until(function() return backend_running(admin, "UPDATE sessions SET deadline") end,
        10, "the heartbeat's backend")
      local killed_at = admin:one("SELECT now()::TEXT AS t").t
      assert.is_true(admin:one("SELECT pg_terminate_backend($1) AS ok", pid).ok)
      -- A heartbeat that succeeds after the old local deadline (at most
      -- one interval after the kill) pushes the deadline past kill + 2
      -- intervals. A lost session would never be pushed again.
      H.wait_until(function()
        local r = admin:one([[SELECT deadline > $1::TIMESTAMPTZ + INTERVAL '4 seconds' AS later
                              FROM sessions WHERE session_id = $2]], killed_at, id)
        return r and r.later
      end, 10, "a heartbeat on a fresh connection")
      assert.equal(id, bmdb.session().id)
    end
  end)

  it("orders a zombie's stalled COMMIT before another host's takeover of its machine", function()
    -- COMMIT of a 'zombie' row sleeps 4 s in a deferred trigger: the
    -- session dies in the database meanwhile and another host claims the
    -- machine. Whatever the zombie committed, the taker must see it: the
    -- two must never both act on the machine unaware of each other.
    admin:exec("CREATE TABLE effects (machine_id UUID NOT NULL, who TEXT NOT NULL, seen INT8)")
    admin:exec([[CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN IF NEW.who = 'zombie' THEN PERFORM pg_sleep(4); END IF; RETURN NULL; END $$]])
    admin:exec([[CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON effects
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()]])
    H.write_file(dir .. "/taker.lua", [[
      local bmdb = require "bmdb"
      local zombie, m = arg[1], arg[2]
      while not bmdb.transact(function(tx)
        return tx:one("SELECT count(*) = 0 OR bool_and(deadline <= now()) AS dead FROM sessions " ..
                      "WHERE session_id = $1", zombie).dead
      end) do bmdb.sleep(0.02) end
      -- the zombie's item died with its session: a failure, so it backs off first
      repeat
        local ok, err = pcall(bmdb.work, m, "Fence", function(w)
          local seen = bmdb.transact(function(tx)
            return tx:one("SELECT count(*) AS n FROM effects WHERE who = 'zombie'").n
          end)
          w:finish(function(tx) tx:exec("INSERT INTO effects VALUES ($1, 'taker', $2)", w.machine, seen) end)
        end)
        if not ok and not bmdb.is_error(err, "backoff") then error(err, 0) end
        if not ok then bmdb.sleep(0.1) end
      until ok
    ]])
    local m = new_machine(admin)
    local taker
    local ok = pcall(bmdb.work, m, "Fence", function(w)
      taker = H.spawn { argv = { H.bin, "--interval", "30", dir .. "/taker.lua", w.session_id, m },
                        env = { BMDB_DSN = dsn } }
      core.pause_heartbeat(true)
      pcall(bmdb.transact, function(tx)
        tx:exec("INSERT INTO effects VALUES ($1, 'zombie', NULL)", w.machine)
      end)
    end)
    assert.is_false(ok) -- the zombie's own finish came too late
    assert.equal(0, taker:wait(60), taker:stderr())
    local zombie = admin:one("SELECT count(*) AS n FROM effects WHERE who = 'zombie'").n
    local seen = admin:one("SELECT seen FROM effects WHERE who = 'taker'").seen
    assert.equal(zombie, seen)
  end)

  it("gets a new session after creating one got no answer in time", function()
    local s = core.session()
    -- SHARE blocks the INSERT of a new session, not reads or KEY SHARE.
    local locker = core.connect(dsn)
    locker:exec("BEGIN")
    locker:exec("LOCK TABLE sessions IN SHARE MODE")
    core.pause_heartbeat(true)
    H.wait_until(function() return not s:alive() end, 10, "the session to be lost")
    core.pause_heartbeat(false)
    -- The heartbeat's INSERT waits on the lock past its bound (the
    -- interval, 2 s): wait until it gave up, or waited well past it.
    local pid = H.wait_until(function() return backend_running(admin, "INSERT INTO sessions") end,
      10, "the heartbeat to try a new session")
    H.wait_until(function()
      local r = admin:one([[SELECT state <> 'active' OR now() - query_start > INTERVAL '3 seconds' AS past
                            FROM pg_stat_activity WHERE pid = $1]], pid)
      return not r or r.past
    end, 10, "the session INSERT to outlive its bound")
    locker:exec("COMMIT")
    locker:close()
    local n = core.session(15)
    assert.is_not_nil(n, "no new session after the database answered again")
    assert.is_true(n:alive())
    assert.are_not.equal(s:id(), n:id())
  end)
end)

describe("a heartbeat while slots hold every pooled connection", function()
  local dsn, admin

  setup(function()
    dsn = H.postgres():create_db()
    core.open { dsn = dsn, component = "fencing_pool", interval = 2, pool = 2, log_level = "error" }
    admin = core.connect(dsn)
  end)

  teardown(function() H.close_core(admin) end)

  it("keeps the session alive through several collection rounds", function()
    local s = core.session()
    local t1, t2 = core.begin(s), core.begin(s) -- the pool's two connections
    local t0 = admin:one("SELECT now()::TEXT AS t").t
    H.wait_until(function()
      return admin:one([[SELECT deadline > $1::TIMESTAMPTZ + INTERVAL '5 seconds' AS later
                         FROM sessions WHERE session_id = $2]], t0, s:id()).later
    end, 15, "heartbeats past two collection rounds")
    assert.is_true(s:alive())
    t1:rollback()
    t2:rollback()
  end)
end)

describe("hosts under database faults", function()
  local dir

  setup(function() dir = H.tmpdir("fencing-hosts") end)

  it("records every decision after a quick database restart: no item stays locked", function()
    local pg = H.postgres { fresh = true }
    local dsn = pg:create_db()
    assert.equal(0, (H.run({ H.bin, "migrate" }, { env = { BMDB_DSN = dsn } })))
    local admin = core.connect(dsn)
    -- The specs' servers trade durability for speed; a crash must not
    -- take back commits here, or a finished item's lock would come back.
    admin:exec("ALTER SYSTEM SET synchronous_commit = on")
    admin:exec("SELECT pg_reload_conf()")
    admin:exec("CREATE TABLE done (machine_id UUID PRIMARY KEY)")
    for _ = 1, 40 do new_machine(admin) end
    H.write_file(dir .. "/restart.lua", [[
      local bmdb = require "bmdb"
      return { bmdb.worker {
        process = "Restart", concurrency = 4, poll = 0.1,
        select = function(tx, limit)
          return tx:query([=[SELECT m.machine_id FROM machines m
            WHERE NOT EXISTS (SELECT 1 FROM done d WHERE d.machine_id = m.machine_id)
              AND NOT EXISTS (SELECT 1 FROM work_blocked b
                              WHERE b.machine_id = m.machine_id AND b.process = 'Restart')
            LIMIT $1]=], limit)
        end,
        run = function(w)
          bmdb.sleep(0.1 + math.random() * 0.2)
          w:finish(function(tx) tx:exec("INSERT INTO done VALUES ($1)", w.machine) end)
        end,
      } }
    ]])
    local host = H.spawn { argv = { H.bin, "--interval", "5", dir .. "/restart.lua" }, env = { BMDB_DSN = dsn } }
    H.wait_until(function() return admin:one("SELECT count(*) AS n FROM done").n >= 8 end, 30, "items to run")
    admin:close()
    pg:stop("immediate")
    pg:start()
    admin = core.connect(dsn)
    local function settled()
      local r = admin:one([[SELECT (SELECT count(*) FROM done) AS done,
                                   (SELECT count(*) FROM work) AS held]])
      return r.done == 40 and r.held == 0
    end
    local ok, err = pcall(H.wait_until, settled, 60, "every machine done and no lock left")
    host:kill("TERM")
    assert(ok, tostring(err) .. "\n" .. host:stderr())
    assert.equal(0, host:wait(30), host:stderr())
    admin:close()
    pg:stop("immediate")
  end)

  it("keeps its session when the heartbeat's backend hangs, and says why a poke failed", function()
    local dsn = H.postgres():create_db()
    assert.equal(0, (H.run({ H.bin, "migrate" }, { env = { BMDB_DSN = dsn } })))
    local admin = core.connect(dsn)
    H.write_file(dir .. "/idle.lua", [[
      local bmdb = require "bmdb"
      return { bmdb.worker { process = "Idle", poll = 1,
        select = function(tx, limit) return {} end, run = function(w) end } }
    ]])
    local host = H.spawn { argv = { H.bin, "--interval", "3", dir .. "/idle.lua" }, env = { BMDB_DSN = dsn } }
    host:await("stderr", "workers started")
    local id = host:stderr():match('session started" session=([%x-]+)')
    local pid = H.wait_until(function() return backend_running(admin, "UPDATE sessions SET deadline") end,
      10, "the heartbeat's backend")
    local stopped_at = admin:one("SELECT now()::TEXT AS t").t
    os.execute("kill -STOP " .. pid)
    local ok, err = pcall(function()
      host:await("stderr", 'msg="database outage started" during=heartbeat')
      -- Pushed on a fresh connection past the frozen one's last chance.
      H.wait_until(function()
        return admin:one([[SELECT deadline > $1::TIMESTAMPTZ + INTERVAL '6 seconds' AS later
                           FROM sessions WHERE session_id = $2]], stopped_at, id).later
      end, 15, "a heartbeat on a fresh connection")
    end)
    os.execute("kill -CONT " .. pid)
    host:kill("TERM")
    assert(ok, tostring(err))
    assert.equal(0, host:wait(30), host:stderr())
    local log = host:stderr()
    assert.matches('msg="database outage started" during=heartbeat error="no answer from the database in time"',
      log, 1, true)
    assert.is_nil(log:find("session lost", 1, true), log)
    admin:close()
  end)

  it("stays killable when a slot that will not stop holds a transaction open", function()
    local dsn = H.postgres():create_db()
    assert.equal(0, (H.run({ H.bin, "migrate" }, { env = { BMDB_DSN = dsn } })))
    local admin = core.connect(dsn)
    admin:exec("CREATE TABLE counters (id INT8 PRIMARY KEY, n INT8 NOT NULL)")
    admin:exec("INSERT INTO counters VALUES (1, 0)")
    new_machine(admin)
    -- The API no longer lets a body wedge itself on its own locks (a
    -- transaction left open by a coroutine is rolled back, a nested one
    -- refused), but a body can still spin, in code the JIT compiled and
    -- no hook reaches, inside a transaction: its fence keeps a lock on
    -- the session row, which ending the session must get past.
    H.write_file(dir .. "/stuck.lua", [[
      local bmdb = require "bmdb"
      return { bmdb.worker {
        process = "Stuck", poll = 0.1,
        select = function(tx, limit) return tx:query("SELECT machine_id FROM machines LIMIT $1", limit) end,
        run = function(w)
          bmdb.transact(function(tx)
            tx:exec("UPDATE counters SET n = n + 1 WHERE id = 1")
            local x = 0
            while true do x = x + 1 end
          end)
        end,
      } }
    ]])
    local host = H.spawn { argv = { H.bin, "--interval", "2", "--grace", "1", dir .. "/stuck.lua" },
                           env = { BMDB_DSN = dsn } }
    local wedged, err = pcall(H.wait_until, function()
      return admin:one([[SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()
                         AND state = 'idle in transaction' AND starts_with(query, 'UPDATE counters')]]).n > 0
    end, 20, "the body to spin inside its transaction")
    assert(wedged, tostring(err) .. "\n" .. host:stderr())
    host:kill("TERM")
    local ok = pcall(host.wait, host, 60)
    assert(ok, "the host did not exit within 60 s of SIGTERM\n" .. host:stderr())
    assert.equal(0, admin:one("SELECT count(*) AS n FROM sessions WHERE component_name = 'stuck'").n, host:stderr())
    assert.equal(0, admin:one("SELECT count(*) AS n FROM work").n)
    assert.equal(0, admin:one("SELECT n FROM counters WHERE id = 1").n) -- its transaction never committed
    assert.matches("ended the database backends of slots that did not stop", host:stderr())
    admin:close()
  end)
end)
