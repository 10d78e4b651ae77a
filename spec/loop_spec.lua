-- Singleton loops (bmdb.loop): real hosts on a real PostgreSQL, killed,
-- frozen and stopped. Whatever dies, one host runs the loop at a time,
-- the schedule is the fleet's, and a frozen holder commits nothing once
-- another took over.
local H = require "support.helpers"

describe("bmdb.loop", function()
  local dsn, admin, dir
  local hosts = {}

  -- A host named `name` (its session's component) running script.
  local function host(name, script, extra)
    local argv = { H.bin, "--interval", "2", "--component", name, "--grace", "5" }
    for _, a in ipairs(extra or {}) do argv[#argv + 1] = a end
    argv[#argv + 1] = script
    local h = H.spawn { argv = argv, env = { BMDB_DSN = dsn } }
    h.name = name
    hosts[#hosts + 1] = h
    return h
  end

  -- The component of the loop's live holder, or nil.
  local function holder(loop)
    local r = admin:one([[SELECT s.component_name AS c FROM loops l JOIN sessions s ON s.session_id = l.session_id
                          AND s.deadline > now() WHERE l.name = $1]], loop)
    return r and r.c
  end

  local function events(loop, event)
    return admin:one("SELECT count(*) AS n FROM loop_history WHERE name = $1 AND event = $2", loop, event).n
  end

  local function stop_all()
    for _, h in ipairs(hosts) do
      h:kill("CONT")
      h:kill("KILL")
      h:wait(10)
    end
    hosts = {}
    admin:exec("DELETE FROM sessions")
  end

  setup(function()
    dsn, admin = H.open_core("loop_spec")
    dir = H.tmpdir("loop")
    admin:exec([[CREATE TABLE runs (id BIGSERIAL PRIMARY KEY, loop TEXT NOT NULL,
                 component TEXT NOT NULL, started_at TIMESTAMPTZ NOT NULL, ended_at TIMESTAMPTZ)]])
    admin:exec("CREATE TABLE ticks (component TEXT NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())")
  end)

  teardown(function()
    stop_all()
    H.close_core(admin)
  end)

  after_each(stop_all)

  -- A loop whose run writes when it started and when it ended, each in a
  -- fenced transaction, with a pause between: two runs at once would
  -- overlap in the table.
  local function timed_loop(name, every, pause)
    local path = dir .. "/" .. name .. ".lua"
    H.write_file(path, string.format([[
      local bmdb = require "bmdb"
      return bmdb.loop { name = %q, every = %s, timeout = 30, run = function(l)
        local me = bmdb.session().component
        local id = bmdb.transact(function(tx)
          return tx:one("INSERT INTO runs (loop, component, started_at) VALUES ($1, $2, clock_timestamp()) RETURNING id",
                        l.name, me).id
        end)
        bmdb.sleep(%s)
        bmdb.transact(function(tx) tx:exec("UPDATE runs SET ended_at = clock_timestamp() WHERE id = $1", id) end)
      end }
    ]], name, every, pause))
    return path
  end

  local function overlaps(loop)
    return admin:one([[SELECT count(*) AS n FROM runs a JOIN runs b ON a.id < b.id AND a.loop = b.loop
                       AND a.started_at < coalesce(b.ended_at, 'infinity') AND b.started_at < coalesce(a.ended_at, 'infinity')
                       WHERE a.loop = $1]], loop).n
  end

  local function finished_runs(loop, where)
    return admin:one("SELECT count(*) AS n FROM runs WHERE loop = $1 AND ended_at IS NOT NULL " .. (where or ""),
                     loop).n
  end

  it("runs in exactly one of three hosts at a time; kill -9 of the holder hands it to another", function()
    local script = timed_loop("three", 0.2, 0.3)
    for i = 1, 3 do host("h" .. i, script) end
    H.wait_until(function() return finished_runs("three") >= 6 end, 30, "six runs")
    local first = holder("three")
    assert.is_not_nil(first)
    -- the standbys ran nothing
    assert.equal(0, admin:one("SELECT count(*) AS n FROM runs WHERE loop = 'three' AND component <> $1", first).n)
    local victim
    for _, h in ipairs(hosts) do if h.name == first then victim = h end end
    victim:kill("KILL")
    victim:wait(10)
    H.wait_until(function()
      local now = holder("three")
      return now and now ~= first
    end, 30, "another host to take the loop over")
    local second = holder("three")
    H.wait_until(function()
      return admin:one("SELECT count(*) AS n FROM runs WHERE loop = 'three' AND component = $1 AND ended_at IS NOT NULL",
                       second).n >= 3
    end, 30, "the new holder's runs")
    assert.equal(0, overlaps("three"))
    assert.equal(2, events("three", "Taken"))
    -- the third host never ran it
    for _, h in ipairs(hosts) do
      if h.name ~= first and h.name ~= second then
        assert.equal(0, admin:one("SELECT count(*) AS n FROM runs WHERE component = $1", h.name).n)
      end
    end
  end)

  it("a holder frozen past its session (SIGSTOP) commits nothing after another took over", function()
    local path = dir .. "/ticker.lua"
    H.write_file(path, [[
      local bmdb = require "bmdb"
      return bmdb.loop { name = "ticker", every = 0.1, run = function(l)
        local me = bmdb.session().component
        -- Ticks for as long as the hold lasts: each a fenced transaction.
        while true do
          bmdb.transact(function(tx) tx:exec("INSERT INTO ticks (component) VALUES ($1)", me) end)
          bmdb.sleep(0.05)
        end
      end }
    ]])
    host("a", path)
    H.wait_until(function() return holder("ticker") == "a" end, 20, "host a to hold the loop")
    local b = host("b", path)
    H.wait_until(function() return admin:one("SELECT count(*) AS n FROM ticks WHERE component = 'a'").n >= 5 end,
      20, "a's ticks")
    local a = hosts[1]
    a:kill("STOP")
    H.wait_until(function() return holder("ticker") == "b" end, 30, "b to take over from frozen a")
    H.wait_until(function() return admin:one("SELECT count(*) AS n FROM ticks WHERE component = 'b'").n >= 5 end,
      20, "b's ticks")
    local taken = admin:one([[SELECT max(occurred_at) AS t FROM loop_history WHERE name = 'ticker' AND event = 'Taken'
                              AND session_id = (SELECT session_id FROM sessions WHERE component_name = 'b')]]).t
    local before = admin:one("SELECT count(*) AS n FROM ticks WHERE component = 'a'").n
    a:kill("CONT")
    -- a wakes with its session past its local deadline: its run's next
    -- transaction is refused, and it stands by
    a:await("stderr", "loop run lost its hold", 30)
    assert.equal(before, admin:one("SELECT count(*) AS n FROM ticks WHERE component = 'a'").n)
    assert.equal(0, admin:one("SELECT count(*) AS n FROM ticks WHERE component = 'a' AND at > $1", taken).n)
    assert.equal("b", holder("ticker"))
    assert.is_true(b:running())
  end)

  it("spaces runs from the end of the last one fleet-wide, across a kill -9 and a clean stop", function()
    local script = timed_loop("spaced", 6, 0)
    local function gaps()
      -- from each run's end to the next run's start, on the server's clock
      return admin:query([[SELECT extract(epoch FROM started_at - lag(ended_at) OVER (ORDER BY started_at))::FLOAT8 AS gap
                           FROM runs WHERE loop = 'spaced' ORDER BY started_at]])
    end
    local a = host("a", script)
    H.wait_until(function() return holder("spaced") == "a" end, 20, "a to hold")
    host("b", script)
    host("c", script)
    H.wait_until(function() return finished_runs("spaced") >= 1 end, 20, "a first run")
    -- kill -9 right after a run ended: the next holder must wait out `every`
    a:kill("KILL")
    a:wait(10)
    H.wait_until(function() return finished_runs("spaced") >= 2 end, 40, "a run by the new holder")
    local second = holder("spaced")
    assert.is_not_nil(second)
    assert.are_not.equal("a", second)
    -- a clean stop of the holder right after its run: handed over at once,
    -- and the next run still waits for `every`
    for _, h in ipairs(hosts) do
      if h.name == second then
        h:kill("TERM")
        assert.equal(0, h:wait(20), h:stderr())
      end
    end
    H.wait_until(function() local now = holder("spaced"); return now and now ~= second end, 10, "the hand-over")
    assert.equal(1, events("spaced", "Released"))
    H.wait_until(function() return finished_runs("spaced") >= 3 end, 40, "a run by the third holder")
    local list = gaps()
    local seen = {}
    for i, r in ipairs(list) do seen[i] = tostring(r.gap) end
    assert.equal(3, #list, "gaps: " .. table.concat(seen, ", "))
    for i = 2, #list do assert.is_true(list[i].gap >= 5.9, "gap " .. i .. " was " .. list[i].gap .. " s") end
  end)

  it("records a failed run and backs off; a run past its timeout fails and its command is stopped", function()
    local path = dir .. "/failing.lua"
    H.write_file(path, [[
      local bmdb = require "bmdb"
      return {
        bmdb.loop { name = "failing", every = 0.2, backoff = { initial = 1, maximum = 4, exponent = 2 },
          run = function() error("provider said 503") end },
        bmdb.loop { name = "slow", every = 60, timeout = 0.5, run = function()
          bmdb.exec { argv = { "sleep", "30" } }
        end },
      }
    ]])
    local h = host("f", path)
    H.wait_until(function() return events("failing", "Failed") >= 3 end, 30, "three failed runs")
    local row = admin:one([[SELECT failures, last_seconds, last_cause, extract(epoch FROM next_run_at - last_finished_at)::FLOAT8 AS wait
                            FROM loops WHERE name = 'failing']])
    assert.is_true(row.failures >= 3)
    assert.matches("provider said 503", row.last_cause)
    assert.is_true(row.last_seconds >= 2, "backoff grew to " .. row.last_seconds)
    assert.matches("provider said 503",
      admin:one("SELECT cause FROM loop_history WHERE name = 'failing' AND event = 'Failed' LIMIT 1").cause)
    H.wait_until(function() return events("slow", "Failed") >= 1 end, 30, "the slow run to fail")
    local slow = admin:one("SELECT last_cause, failures, next_run_at > now() AS later FROM loops WHERE name = 'slow'")
    assert.equal("timeout after 0.5s", slow.last_cause)
    assert.is_true(slow.later)
    -- the sleep was stopped with its run, long before its 30 s
    H.wait_until(function()
      local c, out = H.run { "pgrep", "-P", tostring(h.pid), "-x", "sleep" }
      return c ~= 0 and not out:find("%d")
    end, 10, "the run's command to be stopped")
  end)

  it("a reload keeps the hold; a loop removed from the script is released and another host takes it", function()
    local path = dir .. "/reloaded.lua"
    local text = [[
      local bmdb = require "bmdb"
      return { bmdb.loop { name = "kept", every = 0.2, run = function(l)
        bmdb.transact(function(tx)
          tx:exec("INSERT INTO runs (loop, component, started_at, ended_at) VALUES ($1, $2, now(), now())", l.name, "%s")
        end)
      end } }
    ]]
    H.write_file(path, text:format("v1"))
    local a = host("a", path, { "--watch" })
    H.wait_until(function() return finished_runs("kept", "AND component = 'v1'") >= 2 end, 20, "v1 runs")
    local other = dir .. "/other.lua"
    H.write_file(other, text:format("b"))
    host("b", other)
    H.write_file(path, text:format("v2"))
    H.wait_until(function() return finished_runs("kept", "AND component = 'v2'") >= 2 end, 20, "v2 runs after the reload")
    assert.equal("a", holder("kept"))
    assert.equal(1, events("kept", "Taken"))
    assert.matches("loop hold kept", a:stderr())
    -- the loop is gone from a's script: released, and b takes it at once
    H.write_file(path, [[return { require("bmdb").worker { process = "Idle", select = function() return {} end,
      run = function() end } }]])
    H.wait_until(function() return holder("kept") == "b" end, 20, "b to take the released loop")
    assert.equal(1, events("kept", "Released"))
    H.wait_until(function() return finished_runs("kept", "AND component = 'b'") >= 1 end, 20, "b's runs")
  end)

  it("refuses a bad definition with a clear error naming the loop", function()
    local path = dir .. "/bad.lua"
    H.write_file(path, [[return require("bmdb").loop { name = "x", every = 0, run = 5, colour = "red" }]])
    local code, out, err = H.run({ H.bin, "check", path }, { env = { BMDB_DSN = dsn } })
    assert.equal(2, code, out .. err)
    local text = out .. err
    assert.matches("loop x: every must be a number of seconds above 0, got 0", text, 1, true)
    assert.matches("loop x: run must be a function(l), got number", text, 1, true)
    assert.matches("loop x: unknown field 'colour'", text, 1, true)
    H.write_file(path, [[local bmdb = require "bmdb"
      local function run() end
      return { bmdb.loop { name = "twice", every = 1, run = run }, bmdb.loop { name = "twice", every = 1, run = run } }]])
    code, out, err = H.run({ H.bin, "check", path }, { env = { BMDB_DSN = dsn } })
    assert.equal(2, code, out .. err)
    assert.matches("two loops are named twice", out .. err, 1, true)
    H.write_file(path, [[return require("bmdb").loop { name = "gauge:x", every = 1, run = function() end }]])
    code, out, err = H.run({ H.bin, "check", path }, { env = { BMDB_DSN = dsn } })
    assert.equal(2, code, out .. err)
    assert.matches("loop: name must be a letter", out .. err, 1, true)
  end)
end)
