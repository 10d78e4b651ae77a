-- Poolers (docs/operations.md, "Poolers"), with a real pgbouncer between
-- the hosts and the spec's PostgreSQL: session pooling works as a direct
-- connection does; a transaction pooler is refused by default, before
-- anything is claimed; with --pooler transaction the host runs behind one
-- with no named prepared statement and no LISTEN on the server.
local H = require "support.helpers"
local core = require "bmdb.core"

local function pgbouncer_bin()
  for _, p in ipairs { "/usr/sbin/pgbouncer", "/usr/bin/pgbouncer" } do
    if H.read_file(p) then return p end
  end
  error("pgbouncer not found (Debian's pgbouncer: make check installs it)")
end

-- A pgbouncer on a Unix socket in a directory of its own, in front of
-- the shared server, every database of it, trust authentication. It will
-- not run as root: as the server's user then. size: server connections
-- per database and user.
local function pgbouncer(mode, size)
  local pg = H.postgres()
  local dir = H.tmpdir("pgbouncer")
  H.write_file(dir .. "/users.txt", '"bmdb" ""\n')
  H.write_file(dir .. "/pgbouncer.ini", table.concat({
    "[databases]",
    "* = host=" .. pg.dir .. " port=5432",
    "[pgbouncer]",
    "unix_socket_dir = " .. dir,
    "listen_port = 6432",
    "auth_type = trust",
    "auth_file = " .. dir .. "/users.txt",
    "pool_mode = " .. mode,
    "default_pool_size = " .. size,
    "max_client_conn = 500",
    "", }, "\n"))
  if pg.user then assert(H.run({ "chown", "-R", pg.user.uid .. ":" .. pg.user.gid, dir }) == 0) end
  local b = { dir = dir, proc = H.spawn { argv = { pgbouncer_bin(), dir .. "/pgbouncer.ini" }, user = pg.user } }
  function b.dsn(dbname) return "host=" .. dir .. " port=6432 dbname=" .. dbname .. " user=bmdb" end
  H.wait_until(function()
    assert(b.proc:running(), "pgbouncer exited: " .. b.proc:stderr())
    local ok, c = pcall(core.connect, b.dsn("postgres"))
    if ok then c:close() end
    return ok
  end, 20, "pgbouncer to take connections")
  return b
end

describe("behind pgbouncer", function()
  local dsn, admin, dir, dbname, script

  setup(function()
    dsn, admin = H.open_core("pooler_spec")
    dbname = dsn:match("dbname=(%S+)")
    dir = H.tmpdir("pooler")
    admin:exec("CREATE TABLE done (machine_id UUID NOT NULL)")
    script = dir .. "/pool.lua"
    H.write_file(script, [[
      local bmdb = require "bmdb"
      return bmdb.worker {
        process = "Pool", concurrency = 4, poll = 0.1,
        select = function(tx, limit)
          return tx:query([=[SELECT m.machine_id FROM machines m
            WHERE NOT EXISTS (SELECT 1 FROM done d WHERE d.machine_id = m.machine_id)
            AND NOT EXISTS (SELECT 1 FROM work_blocked b
              WHERE b.machine_id = m.machine_id AND b.process = 'Pool') LIMIT $1]=], limit)
        end,
        run = function(w)
          w:finish(function(tx) tx:exec("INSERT INTO done VALUES ($1)", w.machine) end)
        end,
      }
    ]])
  end)

  teardown(function() H.close_core(admin) end)

  before_each(function()
    admin:exec("DELETE FROM done")
    admin:exec("DELETE FROM work_history")
    admin:exec("DELETE FROM machines")
  end)

  local function machines(n)
    admin:exec("INSERT INTO machines SELECT FROM generate_series(1, $1)", n)
  end

  local function host(b, ...)
    local argv = { H.bin, "--interval", "2", ... }
    argv[#argv + 1] = script
    return H.spawn { argv = argv, env = { BMDB_DSN = b.dsn(dbname) } }
  end

  -- Runs a host until all n items are done, stops it, and checks each ran
  -- once and finished. Its log.
  local function works(h, n)
    h:await("stderr", "workers started", 30)
    H.wait_until(function()
      assert(h:running(), h:stderr())
      return admin:one("SELECT count(*) AS n FROM done").n >= n
    end, 120, n .. " items done")
    h:kill("TERM")
    assert.equal(0, h:wait(60), h:stderr())
    local d = admin:one("SELECT count(*) AS n, count(DISTINCT machine_id) AS distinct_n FROM done")
    assert.equal(n, d.n, "items done, doubles counted")
    assert.equal(n, d.distinct_n)
    local hist = admin:one([[SELECT count(*) FILTER (WHERE event = 'Finished') AS finished,
                                    count(*) FILTER (WHERE event NOT IN ('Started', 'Finished')) AS other
                             FROM work_history]])
    assert.equal(n, hist.finished)
    assert.equal(0, hist.other, "events other than Started and Finished")
    local log = h:stderr()
    assert.is_nil(log:find("prepared statement", 1, true), log)
    assert.is_nil(log:find("level=error", 1, true), log)
    return log
  end

  it("in session mode works as a direct connection does", function()
    local b = pgbouncer("session", 40)
    machines(500)
    local log = works(host(b), 500)
    assert.is_nil(log:find("transaction pooler", 1, true), log)
  end)

  it("in transaction mode is refused by default: the host says what it saw and what to do, and claims nothing",
    function()
      local b = pgbouncer("transaction", 4)
      machines(20)
      local code, out, err = H.run({ H.bin, "--interval", "2", script }, { env = { BMDB_DSN = b.dsn(dbname) } })
      assert.equal(1, code, out .. err)
      assert.matches("refusing to start: ", err, 1, true)
      assert.matches("a pooler in transaction or statement mode (pgbouncer pool_mode=transaction?)", err, 1, true)
      assert.matches("pool_mode=session", err, 1, true)
      assert.matches("--pooler transaction", err, 1, true)
      assert.equal(0, admin:one("SELECT count(*) AS n FROM work_history").n)
      assert.equal(0, admin:one("SELECT count(*) AS n FROM sessions WHERE component_name = 'pool'").n)
      -- the operator's commands are refused the same way
      code, out, err = H.run({ H.bin, "status" }, { env = { BMDB_DSN = b.dsn(dbname) } })
      assert.equal(1, code, out .. err)
      assert.matches("refusing to start: ", err, 1, true)
    end)

  it("in transaction mode runs with --pooler transaction: no named statement, no LISTEN on the server", function()
    -- One server connection for every client: whatever any client left on
    -- it (a prepared statement, a LISTEN) the next finds there.
    local b = pgbouncer("transaction", 1)
    machines(300)
    local h = host(b, "--pooler", "transaction")
    local log = works(h, 300)
    local _, n = log:gsub('msg="behind a transaction pooler', "")
    assert.equal(1, n, log)
    local server = core.connect(b.dsn(dbname))
    local st = server:one([[SELECT (SELECT count(*) FROM pg_prepared_statements) AS prepared,
                                   (SELECT count(*) FROM pg_listening_channels()) AS listening]])
    server:close()
    assert.equal(0, st.prepared, "statements prepared on the pooled backend")
    assert.equal(0, st.listening, "channels the pooled backend listens on")
    -- and the operator's commands run there too
    local code, out, err = H.run({ H.bin, "--pooler", "transaction", "status" },
      { env = { BMDB_DSN = b.dsn(dbname) } })
    assert.equal(0, code, out .. err)
    -- migrations of a fresh database too
    local fresh = H.postgres():create_db():match("dbname=(%S+)")
    code, out, err = H.run({ H.bin, "--pooler", "transaction", "migrate" }, { env = { BMDB_DSN = b.dsn(fresh) } })
    assert.equal(0, code, out .. err)
    code, out, err = H.run({ H.bin, "--pooler", "transaction", "migrate", "status" },
      { env = { BMDB_DSN = b.dsn(fresh) } })
    assert.equal(0, code, out .. err)
    assert.is_nil((out .. err):find("pending", 1, true), out .. err)
  end)

  -- A slot that will not stop, spinning inside a transaction (as in
  -- fencing_spec): at shutdown its backend must be ended for the session
  -- to end. The host's log.
  local function stuck(b, ...)
    admin:exec("CREATE TABLE IF NOT EXISTS counters (id INT8 PRIMARY KEY, n INT8 NOT NULL)")
    admin:exec("INSERT INTO counters VALUES (1, 0) ON CONFLICT (id) DO UPDATE SET n = 0")
    machines(1)
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
    local argv = { H.bin, "--interval", "2", "--grace", "1", ... }
    argv[#argv + 1] = dir .. "/stuck.lua"
    local h = H.spawn { argv = argv, env = { BMDB_DSN = b.dsn(dbname) } }
    H.wait_until(function()
      assert(h:running(), h:stderr())
      return admin:one([[SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()
                         AND state = 'idle in transaction' AND starts_with(query, 'UPDATE counters')]]).n > 0
    end, 20, "the body to spin inside its transaction")
    h:kill("TERM")
    assert(pcall(h.wait, h, 60), "the host did not exit within 60 s of SIGTERM\n" .. h:stderr())
    assert.equal(0, admin:one("SELECT n FROM counters WHERE id = 1").n) -- its transaction never committed
    return h:stderr()
  end

  it("in session mode ends a stuck slot's own backend at shutdown (by the server's pid, not pgbouncer's)",
    function()
      local b = pgbouncer("session", 40)
      local log = stuck(b)
      assert.matches("ended the database backends of slots that did not stop", log, 1, true)
      assert.equal(0, admin:one("SELECT count(*) AS n FROM sessions WHERE component_name = 'stuck'").n, log)
      assert.equal(0, admin:one("SELECT count(*) AS n FROM work").n)
    end)

  it("in transaction mode ends no backend by pid: the stuck slot's session is left to its deadline", function()
    local b = pgbouncer("transaction", 4)
    local log = stuck(b, "--pooler", "transaction")
    assert.is_nil(log:find("ended the database backends", 1, true), log)
    assert.matches("could not end the session; it expires at its deadline", log, 1, true)
    admin:exec("DELETE FROM work")
    admin:exec("DELETE FROM sessions WHERE component_name = 'stuck'")
  end)

  it("--pooler takes only refuse, session or transaction", function()
    local code, out, err = H.run({ H.bin, "--pooler", "statement", script })
    assert.equal(2, code, out .. err)
    assert.matches("--pooler: expected refuse, session or transaction, got 'statement'", err, 1, true)
  end)
end)
