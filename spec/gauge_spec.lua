-- bmdb.gauge: fleet gauges. Their rules at definition; in-process, what a
-- run makes of its query's rows (labels and values, a vanished label set
-- removed, errors, read-only, the release clearing every series); and on
-- two real hosts, that exactly one exports the gauge, and the other once
-- the first is killed.
local H = require "support.helpers"
local http = require "support.http"
local core = require "bmdb.core"
local bmdb = require "bmdb"
local G = require "bmdb.gauge"
local K = core.kinds

local have_loops = pcall(require, "bmdb.loop")

local function definition_error(def)
  local ok, err = pcall(bmdb.gauge, def)
  assert.is_false(ok, "accepted")
  assert(bmdb.is_error(err, K.definition), "not a definition error: " .. tostring(err))
  return err.message
end

-- The lines of a /metrics text that start with prefix.
local function lines(text, prefix)
  local t = {}
  for l in text:gmatch("[^\n]+") do
    if l:sub(1, #prefix) == prefix then t[#t + 1] = l end
  end
  return t
end

describe("bmdb.gauge", function()
  describe("refuses at definition, with a definition error naming what is wrong", function()
    local ok_def = { name = "gd_ok", help = "h", every = 30, sql = "SELECT 1" }
    local function with(k, v)
      local d = {}
      for kk, vv in pairs(ok_def) do d[kk] = vv end
      d[k] = v
      return d
    end

    it("a definition that is not a table", function()
      assert.matches("a gauge definition must be a table, got string", definition_error("gd"))
    end)

    it("a name Prometheus or the host refuses", function()
      assert.matches("the name must be a string, got nil", definition_error(with("name", nil)))
      assert.matches("invalid metric name '9lives'", definition_error(with("name", "9lives")))
      assert.matches("invalid metric name 'a%-b'", definition_error(with("name", "a-b")))
      assert.matches("the prefix bmdb_ is the host's own", definition_error(with("name", "bmdb_machines_by_region")))
    end)

    it("an sql that is not a non-empty string", function()
      assert.matches("gauge gd_ok: sql must be a non%-empty string .*got nil", definition_error(with("sql", nil)))
      assert.matches("sql must be a non%-empty string .*got an empty one", definition_error(with("sql", "  \n")))
      assert.matches("sql must be a non%-empty string .*got table", definition_error(with("sql", {})))
    end)

    it("an every that is not a number of seconds above 0", function()
      for _, v in ipairs { 0, -1, "30", math.huge, 0 / 0 } do
        assert.matches("gauge gd_ok: every must be a number of seconds above 0, got " .. tostring(v):gsub("%p", "%%%0"),
                       definition_error(with("every", v)))
      end
      assert.matches("every must be a number of seconds above 0, got nil", definition_error(with("every", nil)))
    end)

    it("a name too long for its loop's", function()
      assert.matches("gauge: name '" .. ("x"):rep(53) .. "' is 53 characters, at most 52 %(its loop is gauge:<name>%)",
                     definition_error(with("name", ("x"):rep(53))))
      assert.equal("gauge:" .. ("x"):rep(52), bmdb.gauge(with("name", ("x"):rep(52))).name)
    end)

    it("a help that is not a string, and unknown fields", function()
      assert.matches("gauge gd_ok: help must be a string, got number", definition_error(with("help", 3)))
      assert.matches("gauge gd_ok: unknown field 'labels'", definition_error(with("labels", { "a" })))
    end)

    it("every problem at once, at the caller's line", function()
      local ok, err = pcall(function() bmdb.gauge { name = "bmdb_x", every = 0, sql = "", timeout = 3 } end)
      assert.is_false(ok)
      local msg = err.message
      assert.equal(K.definition, err.kind)
      assert.matches("^spec/gauge_spec.lua:%d+: ", msg)
      assert.matches("prefix bmdb_", msg)
      assert.matches("every must be", msg)
      assert.matches("sql must be", msg)
      assert.matches("unknown field 'timeout'", msg)
    end)

    it("a valid one is a built-in loop named gauge:<metric>", function()
      local l = bmdb.gauge(ok_def)
      assert.equal("gauge:gd_ok", l.name)
      assert.equal(30, l.every)
    end)
  end)

  describe("a run, in-process", function()
    local admin
    local alive = { alive = function() return true end }
    local dead = { alive = function() return false end }

    setup(function()
      local _
      _, admin = H.open_core("gauge_spec")
      admin:exec("CREATE TABLE racks (machine_id UUID PRIMARY KEY, region TEXT, rack TEXT, watts INT8)")
    end)

    teardown(function() H.close_core(admin) end)

    local function rack(region, rk, watts)
      admin:exec("INSERT INTO racks VALUES (gen_random_uuid(), $1, $2, $3)", region, rk, watts)
    end

    local function series(prefix) return lines(core.metric_text(), prefix) end

    it("sets one series per row, labels from the columns, the last column the value; replaces the last run's", function()
      local s = G.state { name = "gr_by_region", help = "Machines by region.",
                          sql = "SELECT region, count(*) AS n FROM racks GROUP BY 1 ORDER BY 1" }
      rack("eu", "r1", 10); rack("eu", "r2", 20); rack("us", "r1", 30)
      assert.equal(2, s.run(alive))
      local text = core.metric_text()
      assert.matches("# HELP gr_by_region Machines by region.\n# TYPE gr_by_region gauge\n", text, 1, true)
      assert.same({ 'gr_by_region{region="eu"} 2', 'gr_by_region{region="us"} 1' }, series("gr_by_region{"))

      -- eu gone, ap new, us changed: eu's series is removed
      admin:exec("DELETE FROM racks WHERE region = 'eu'")
      rack("ap", "r9", 1); rack("us", "r2", 5)
      s.run(alive)
      assert.same({ 'gr_by_region{region="us"} 2', 'gr_by_region{region="ap"} 1' }, series("gr_by_region{"))

      -- a run whose hold is gone by the time its rows are back sets nothing
      admin:exec("DELETE FROM racks WHERE region = 'ap'")
      s.run(dead)
      assert.same({ 'gr_by_region{region="us"} 2', 'gr_by_region{region="ap"} 1' }, series("gr_by_region{"))

      -- the release: every series goes, the family stays empty
      s.clear()
      assert.same({}, series("gr_by_region{"))
      assert.same({ "# TYPE gr_by_region gauge" }, series("# TYPE gr_by_region"))
      -- and a run after it starts afresh
      s.run(alive)
      assert.same({ 'gr_by_region{region="us"} 2' }, series("gr_by_region{"))
      s.clear()
    end)

    it("a new state of the loop (the code after a reload) drops what the last one left; a removed gauge's go", function()
      admin:exec("DELETE FROM racks")
      rack("eu", "r1", 10); rack("us", "r1", 30)
      local def = { name = "gr_reload", sql = "SELECT region, count(*) AS n FROM racks GROUP BY 1 ORDER BY 1" }
      local before = G.state(def)
      before.run(alive)
      assert.same({ 'gr_reload{region="eu"} 1', 'gr_reload{region="us"} 1' }, series("gr_reload{"))
      admin:exec("DELETE FROM racks WHERE region = 'eu'")
      local after = G.state(def)
      after.run(alive)
      assert.same({ 'gr_reload{region="us"} 1' }, series("gr_reload{"))
      -- the reload removed the gauge from the script: its series go
      G.removed("reconcile") -- not a gauge's loop: nothing
      G.removed("gauge:no_such_metric")
      assert.same({ 'gr_reload{region="us"} 1' }, series("gr_reload{"))
      G.removed("gauge:gr_reload")
      assert.same({}, series("gr_reload{"))
    end)

    it("several labels, numbers and numerics as values, and no labels at all", function()
      admin:exec("DELETE FROM racks")
      rack("eu", "r1", 10); rack("eu", "r1", 20); rack("eu", "r2", 7)
      local s = G.state { name = "gr_watts", sql = [[SELECT region, rack, sum(watts) / 2 AS half
                                                    FROM racks GROUP BY 1, 2 ORDER BY 1, 2]] }
      s.run(alive)
      assert.same({ 'gr_watts{region="eu",rack="r1"} 15', 'gr_watts{region="eu",rack="r2"} 3.5' },
                  series("gr_watts{"))
      local one = G.state { name = "gr_total", sql = "SELECT count(*) FROM racks" }
      one.run(alive)
      assert.same({ "gr_total 3" }, series("gr_total "))
      one.clear()
      assert.same({}, series("gr_total "))
      -- an integer past 2^53 comes as text: still a number
      local big = G.state { name = "gr_big", sql = "SELECT 'x' AS k, 9007199254740993::INT8" }
      big.run(alive)
      assert.same({ 'gr_big{k="x"} 9007199254740992' }, series("gr_big{"))
      s.clear(); big.clear()
    end)

    it("refuses a NULL label, a value that is no number, labels twice, a bad column name: the last run's series stay", function()
      admin:exec("DELETE FROM racks")
      rack("eu", "r1", 10)
      local sql = "SELECT region, count(*) FROM racks GROUP BY 1"
      local def = { name = "gr_bad", sql = sql }
      local s = G.state(def)
      s.run(alive)
      assert.same({ 'gr_bad{region="eu"} 1' }, series("gr_bad{"))
      local function run_error(q)
        def.sql = q
        local ok, err = pcall(s.run, alive)
        assert.is_false(ok)
        assert(bmdb.is_error(err), tostring(err))
        return err
      end
      local e = run_error("SELECT NULL::TEXT AS region, 1")
      assert.equal(K.usage, e.kind)
      assert.matches("gauge gr_bad: row 1: label 'region' is NULL", e.message, 1, true)
      e = run_error("SELECT 'eu' AS region, 'many' AS n")
      assert.matches("gauge gr_bad: row 1: the value ('n', the last column) is not a number: many", e.message, 1, true)
      e = run_error("SELECT 'eu' AS region, NULL::INT8 AS n")
      assert.matches("the value ('n', the last column) is NULL", e.message, 1, true)
      e = run_error("SELECT 'eu' AS region, true AS n")
      assert.matches("is not a number: true", e.message, 1, true)
      e = run_error("SELECT 'eu' AS region, 1 UNION ALL SELECT 'us', 2 UNION ALL SELECT 'eu', 3")
      assert.matches("gauge gr_bad: rows 1 and 3 have the same labels (eu)", e.message, 1, true)
      assert.same({ 'gr_bad{region="eu"} 1' }, series("gr_bad{"))
      -- the column names are the labels: the rules of bmdb.metrics, at the first run
      local odd = G.state { name = "gr_odd", sql = [[SELECT 'a' AS "bad-name", 1]] }
      local ok, err = pcall(odd.run, alive)
      assert.is_false(ok)
      assert.matches("metric 'gr_odd': invalid label name 'bad%-name'", err.message)
      s.clear()
    end)

    it("runs its query read-only, inside the host's transaction", function()
      admin:exec("DELETE FROM racks")
      rack("eu", "r1", 10)
      local s = G.state { name = "gr_ro", sql = "DELETE FROM racks RETURNING region, watts" }
      local ok, err = pcall(s.run, alive)
      assert.is_false(ok)
      assert.equal(K.sql, err.kind)
      assert.equal("25006", err.sqlstate) -- read_only_sql_transaction
      assert.equal(1, tonumber(admin:one("SELECT count(*) AS n FROM racks").n))
      local c = G.state { name = "gr_commit", sql = "COMMIT" }
      ok, err = pcall(c.run, alive)
      assert.is_false(ok)
      assert.matches("COMMIT is refused", err.message)
    end)
  end)

  describe("on two hosts", function()
    local dsn, admin, dir

    setup(function()
      dsn = H.postgres():create_db()
      assert.equal(0, (H.run({ H.bin, "migrate" }, { env = { BMDB_DSN = dsn } })))
      admin = core.connect(dsn)
      admin:exec("CREATE TABLE regions (machine_id UUID PRIMARY KEY REFERENCES machines, region TEXT NOT NULL)")
      for i = 1, 5 do
        local m = admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
        admin:exec("INSERT INTO regions VALUES ($1, $2)", m, i <= 3 and "eu" or "us")
      end
      dir = H.tmpdir("gauge")
      H.write_file(dir .. "/fleet.lua", [[
        local bmdb = require "bmdb"
        return {
          bmdb.worker { process = "Idle", poll = 1,
            select = function() return {} end, run = function() end },
          bmdb.gauge { name = "fleet_machines_by_region", help = "Machines by region.", every = 1,
            sql = "SELECT region, count(*) FROM regions GROUP BY 1 ORDER BY 1" },
        }
      ]])
    end)

    teardown(function() if admin then admin:close() end end)

    it("is exported by exactly one of them, and by the other once the first is killed", function()
      if not have_loops then
        pending("needs bmdb.loop (singleton loops) in this tree")
        return
      end
      local function host(component)
        local p = H.spawn { argv = { H.bin, "--interval", "1", "--component", component, "--http", "127.0.0.1:0",
                                     dir .. "/fleet.lua" }, env = { BMDB_DSN = dsn } }
        p:await("stderr", "workers started", 30)
        local port = tonumber(p:stderr():match("http listening.-address=127%.0%.0%.1:(%d+)"))
        assert(port, p:stderr())
        return { p = p, port = port, component = component }
      end
      -- The component of the live session that holds the gauge's loop, if any.
      local function holder_now()
        local r = admin:one([[SELECT s.component_name AS c FROM loops l JOIN sessions s ON s.session_id = l.session_id
                              WHERE l.name = 'gauge:fleet_machines_by_region' AND s.deadline > now()]])
        return r and r.c
      end
      local function exported(h)
        local status, _, body = http.get(h.port, "/metrics")
        if status ~= 200 then return nil end
        return lines(body, "fleet_machines_by_region{")
      end
      local want = { 'fleet_machines_by_region{region="eu"} 3', 'fleet_machines_by_region{region="us"} 2' }
      local a, b = host("gauge-a"), host("gauge-b")
      local holder, other
      H.wait_until(function()
        local ea, eb = exported(a), exported(b)
        if ea and #ea > 0 then holder, other = a, b end
        if eb and #eb > 0 then holder, other = b, a end
        return holder ~= nil
      end, 30, "one host to export the gauge")
      -- a few runs later still one exporter: the standby never ran it
      H.wait_until(function()
        return tonumber(admin:one("SELECT count(*) AS n FROM loop_history WHERE name = " ..
                                  "'gauge:fleet_machines_by_region' AND event = 'Finished'").n) >= 3
      end, 30, "three runs of the gauge")
      assert.same(want, exported(holder))
      assert.same({}, exported(other))
      assert.equal(holder.component, holder_now())

      -- The holder loses its session but lives on: the other takes the
      -- hold, and the one that lost it exports nothing any more (its
      -- release removed the series). It may take the hold back with its
      -- new session first: then again, until the hold moves.
      for _ = 1, 10 do
        admin:exec("DELETE FROM sessions WHERE component_name = $1", holder.component)
        local now = H.wait_until(function() return holder_now() end, 30, "a live holder")
        if now == other.component then break end
      end
      assert.equal(other.component, holder_now())
      H.wait_until(function() local e = exported(other) return e and #e == 2 end, 30,
                   "the new holder to export the gauge")
      assert.same({}, exported(holder))
      assert.same(want, exported(other))
      holder, other = other, holder

      -- the holder dies without a word: the other takes the loop over and exports
      holder.p:kill("KILL")
      holder.p:wait(10)
      H.wait_until(function() local e = exported(other) return e and #e == 2 end, 60,
                   "the other host to export the gauge")
      assert.same(want, exported(other))
      other.p:kill("TERM")
      assert.equal(0, other.p:wait(40), other.p:stderr())
    end)
  end)
end)
