-- status and history: --json for scripts (parsed by PostgreSQL's jsonb),
-- and the text form within 100 columns, for a known fleet state.
local H = require "support.helpers"
local core = require "bmdb.core"

describe("status and history", function()
  local dsn, admin, dir, m, p

  local function host(args)
    local argv = { H.bin }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    local code, out, err = H.run(argv, { env = { BMDB_DSN = dsn } })
    assert.equal(0, code, err)
    return out
  end

  local function json(text, path)
    return admin:one("SELECT ($1::jsonb #>> $2::TEXT[]) AS v", text, path).v
  end

  setup(function()
    dsn = H.postgres():create_db()
    assert.equal(0, (H.run({ H.bin, "migrate" }, { env = { BMDB_DSN = dsn } })))
    admin = core.connect(dsn)
    dir = H.tmpdir("report")
    m = admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
    -- a finished item, a failure with a long, multi-line cause (backoff),
    -- and one held by a host that is still running
    H.write_file(dir .. "/state.lua", [[
      local bmdb = require "bmdb"
      bmdb.work(arg[1], "Report", function() end)
      bmdb.work(arg[1], "Broken", function(w) w:fail("line one\n\"quoted\" " .. string.rep("x", 300), 3600) end)
      bmdb.work(arg[1], "Held", function()
        io.stdout:write("holding\n"); io.stdout:flush()
        while not io.open(arg[2]) do bmdb.sleep(0.02) end
      end)
    ]])
    p = H.spawn { argv = { H.bin, "--component", "reporter", dir .. "/state.lua", m, dir .. "/release" },
      env = { BMDB_DSN = dsn } }
    H.wait_until(function() return p:stdout():match("holding") end, 20, "the lock")
  end)

  teardown(function()
    H.write_file(dir .. "/release", "")
    p:wait(20)
    admin:close()
  end)

  it("status --json is one object: sessions, work, pauses, holds and backoffs with stable keys", function()
    local out = host { "status", "--json" }
    assert.equal("object", admin:one("SELECT jsonb_typeof($1::jsonb) AS t", out).t)
    local keys = "sessions,work,paused,holds,backoffs,processes,failures,loops,loop_history"
    assert.equal(keys, admin:one(
      "SELECT string_agg(k, ',' ORDER BY array_position(string_to_array($2, ','), k)) AS k " ..
      "FROM jsonb_object_keys($1::jsonb) AS k", out, keys).k)
    assert.equal("running", json(out, "{work,0,state}"))
    assert.equal("reporter", json(out, "{sessions,0,component}"))
    assert.equal("live", json(out, "{sessions,0,state}"))
    assert.equal(m, json(out, "{work,0,machine_id}"))
    assert.equal("Held", json(out, "{work,0,process}"))
    assert.equal("Broken", json(out, "{backoffs,0,process}"))
    assert.equal("number", admin:one("SELECT jsonb_typeof($1::jsonb #> '{backoffs,0,attempts}') AS t", out).t)
    assert.equal("line one\n\"quoted\" " .. string.rep("x", 300), json(out, "{backoffs,0,cause}"))
  end)

  describe("per process and per loop", function()
    local m2, live, fail_at
    setup(function()
      m2 = admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
      live = admin:one("SELECT session_id FROM sessions WHERE component_name = 'reporter'").session_id
      -- Flaky: seven failures in the last hour (five on m, two on m2), one
      -- two hours ago, one two days ago; each cause two lines
      fail_at = {}
      for i, at in ipairs { 1, 2, 3, 4, 5, 6, 7, 120, 2880 } do
        local machine = (i == 2 or i == 5) and m2 or m
        fail_at[i] = admin:one([[INSERT INTO work_history (machine_id, process, session_id, event, cause, occurred_at)
          VALUES ($1, 'Flaky', $2, 'Failed', $3, now() - $4 * INTERVAL '1 minute') RETURNING occurred_at::TEXT AS t]],
          machine, live, "flake " .. i .. "\nsecond line", at).t
      end
      admin:exec("INSERT INTO processes (process) VALUES ('Idle')") -- a registered process with nothing to count
      admin:exec("INSERT INTO work_history (machine_id, process, session_id, event, occurred_at) " ..
        "VALUES ($1, 'Flaky', $2, 'Finished', now())", m, live)
      -- three loops: held by the live host, held by a session that is gone,
      -- never held; the first with a failure and a few events
      admin:exec([[INSERT INTO loops (name, session_id, token, held_since, next_run_at, last_started_at,
          last_finished_at, failures, last_seconds, last_cause)
        VALUES ('reconcile', $1, gen_random_uuid(), now() - INTERVAL '10 minutes', now() + INTERVAL '30 seconds',
          now() - INTERVAL '90 seconds', now() - INTERVAL '80 seconds', 2, 20, 'provider down' || chr(10) || 'traceback'),
          ('gauge:queue', gen_random_uuid(), gen_random_uuid(), now() - INTERVAL '1 day', now(), NULL, NULL, 0,
          NULL, NULL), ('idle', NULL, NULL, NULL, now(), NULL, NULL, 0, NULL, NULL)]], live)
      for i, e in ipairs { "Taken", "Started", "Failed", "Started", "Failed" } do
        admin:exec([[INSERT INTO loop_history (name, session_id, event, cause, occurred_at)
          VALUES ('reconcile', $1, $2, $3, now() - INTERVAL '10 minutes' + $4 * INTERVAL '1 minute')]],
          live, e, e == "Failed" and ("provider down " .. i) or nil, i)
      end
      for i = 1, 12 do
        admin:exec([[INSERT INTO loop_history (name, session_id, event, occurred_at)
          VALUES ('gauge:queue', gen_random_uuid(), 'Started', now() - $1 * INTERVAL '1 minute')]], i)
      end
    end)

    teardown(function()
      admin:exec("DELETE FROM work_history WHERE process = 'Flaky'")
      admin:exec("DELETE FROM processes WHERE process = 'Idle'")
      admin:exec("DELETE FROM loop_history")
      admin:exec("DELETE FROM loops")
    end)

    local function rows(out, key, fields)
      return admin:one(([[SELECT string_agg(%s, ' ' ORDER BY n) AS s
        FROM jsonb_array_elements($1::jsonb -> $2) WITH ORDINALITY AS a(e, n)]]):format(fields), out, key).s
    end

    it("counts each process's work in flight, backoffs and failures of the last hour", function()
      local out = host { "status", "--json" }
      assert.equal("Broken:0:1:1:1 Flaky:0:0:2:7 Held:1:0:0:0 Idle:0:0:0:0", rows(out, "processes",
        "(e->>'process') || ':' || (e->>'in_flight') || ':' || (e->>'in_backoff') || ':' || " ..
        "(e->>'failed_machines_1h') || ':' || (e->>'failures_1h')"))
      assert.equal("number", json(out, "{processes,0}") and admin:one(
        "SELECT jsonb_typeof($1::jsonb #> '{processes,0,failures_1h}') AS t", out).t)
    end)

    it("lists the five latest failures per process, newest first, with the cause's first line and whole", function()
      local out = host { "status", "--json" }
      assert.equal("Broken Flaky Flaky Flaky Flaky Flaky", rows(out, "failures", "e->>'process'"))
      assert.equal("flake 1 flake 2 flake 3 flake 4 flake 5", rows(out, "failures",
        "e->>'cause_line'") :gsub("^line one ", ""))
      assert.equal(m2, json(out, "{failures,2,machine_id}"))
      assert.equal(fail_at[1], json(out, "{failures,1,occurred_at}"))
      assert.equal("flake 1\nsecond line", json(out, "{failures,1,cause}"))
      assert.equal("line one", json(out, "{failures,0,cause_line}"))
      local text = host { "status" }
      assert.matches("processes %(failed: in the last hour%) %(4%)", text)
      assert.matches("\n  Flaky%s+0%s+0%s+2%s+7\n", text)
      assert.matches("latest failures %(5 per process, last 24 h%) %(6%)", text)
      assert.matches("Flaky%s+" .. m2:gsub("%-", "%%-") .. "%s+%d+%s+flake 2\n", text)
      assert.is_nil(text:find("flake 8", 1, true), "the failure of two hours ago is not among the five latest")
    end)

    it("names each loop's live holder, its times, failures and cause, and its latest events", function()
      local out = host { "status", "--json" }
      assert.equal("gauge:queue idle reconcile", rows(out, "loops", "e->>'name'"))
      -- a holder only while its session is live
      assert.equal("null null " .. live, rows(out, "loops", "COALESCE(e->>'holder', 'null')"))
      assert.equal("reporter", json(out, "{loops,2,holder_component}"))
      assert.matches(":%d+$", json(out, "{loops,2,holder_runtime}"))
      assert.equal("null", admin:one("SELECT jsonb_typeof($1::jsonb #> '{loops,0,held_since}') AS t", out).t)
      assert.is_not_nil(json(out, "{loops,2,held_since}"))
      assert.is_not_nil(json(out, "{loops,2,last_started_at}"))
      assert.is_not_nil(json(out, "{loops,2,last_finished_at}"))
      assert.is_true(admin:one("SELECT ($1::TIMESTAMPTZ > now()) AS f", json(out, "{loops,2,next_run_at}")).f)
      assert.equal("2", json(out, "{loops,2,failures}"))
      assert.equal("20", json(out, "{loops,2,last_seconds}"))
      assert.equal("provider down\ntraceback", json(out, "{loops,2,last_cause}"))
      -- the latest ten events per loop, newest first
      local events = rows(out, "loop_history", "(e->>'name') || ':' || (e->>'event')")
      assert.equal(string.rep("gauge:queue:Started ", 10) ..
        "reconcile:Failed reconcile:Started reconcile:Failed reconcile:Started reconcile:Taken", events)
      assert.equal("provider down 5", json(out, "{loop_history,10,cause}"))
      local text = host { "status" }
      assert.matches("\n  reconcile%s+%S+:%d+%s+%d+%s+9%d%s+8%d%s+%d+%s+2%s+provider down\n", text)
      assert.matches("\n  idle%s+none%s", text)
      assert.matches("\n  gauge:queue%s+none%s", text)
      assert.matches("loop history %(newest 10 per loop%) %(15%)", text)
    end)
  end)

  it("names a loop's holder only while its session is live (a fleet no host collects)", function()
    local quiet = H.postgres():create_db()
    assert.equal(0, (H.run({ H.bin, "migrate" }, { env = { BMDB_DSN = quiet } })))
    local db = core.connect(quiet)
    local function session(deadline)
      return db:one([[INSERT INTO sessions (component_name, runtime_info, interval_seconds, deadline)
        VALUES ('looper', 'box:1', 5, now() + $1 * INTERVAL '1 second') RETURNING session_id]], deadline).session_id
    end
    local live, expired = session(3600), session(-10)
    db:exec([[INSERT INTO loops (name, session_id, token, held_since) VALUES
      ('a', $1, gen_random_uuid(), now()), ('b', $2, gen_random_uuid(), now())]], live, expired)
    local code, out, err = H.run({ H.bin, "status", "--json" }, { env = { BMDB_DSN = quiet } })
    assert.equal(0, code, err)
    db:close()
    assert.equal(live, json(out, "{loops,0,holder}"))
    assert.equal("box:1", json(out, "{loops,0,holder_runtime}"))
    assert.is_nil(json(out, "{loops,1,holder}"))
    assert.is_nil(json(out, "{loops,1,held_since}"))
    assert.equal("expired", json(out, "{sessions,1,state}"))
  end)

  it("shows a loop a real host holds: its session, its failed runs and their cause", function()
    local quiet = H.postgres():create_db()
    H.write_file(dir .. "/looper.lua", [[
      local bmdb = require "bmdb"
      return { bmdb.loop { name = "tick", every = 0.2, backoff = { initial = 2 },
        run = function(l) error("tick failed\nsecond line") end } }
    ]])
    -- (--keep-history 0: only the script's own loop)
    local host_p = H.spawn { argv = { H.bin, "--component", "looper", "--keep-history", "0", dir .. "/looper.lua" },
                             env = { BMDB_DSN = quiet } }
    local db = core.connect(quiet)
    H.wait_until(function()
      local ok, r = pcall(db.one, db, "SELECT count(*) AS n FROM loop_history WHERE name = 'tick' AND event = 'Failed'")
      return ok and r.n >= 2
    end, 30, "two failed runs of the loop")
    local session = db:one("SELECT session_id FROM sessions WHERE component_name = 'looper'").session_id
    local code, out, err = H.run({ H.bin, "status", "--json" }, { env = { BMDB_DSN = quiet } })
    assert.equal(0, code, err)
    host_p:kill("TERM")
    assert.equal(0, host_p:wait(30), host_p:stderr())
    db:close()
    assert.equal("tick", json(out, "{loops,0,name}"))
    assert.equal(session, json(out, "{loops,0,holder}"))
    assert.equal("looper", json(out, "{loops,0,holder_component}"))
    assert.is_true(tonumber(json(out, "{loops,0,failures}")) >= 2)
    assert.matches("tick failed", json(out, "{loops,0,last_cause}"), 1, true)
    local events = admin:one([[SELECT string_agg(e->>'event', ' ' ORDER BY n) AS s
      FROM jsonb_array_elements($1::jsonb -> 'loop_history') WITH ORDINALITY AS a(e, n)]], out).s
    assert.matches("Failed", events, 1, true)
    assert.matches("Failed Started Failed Started Taken$", events) -- newest first; the third run is 4 s off
  end)

  it("history --json is one object with the machine and its events, oldest first", function()
    local out = host { "history", m, "--json" }
    assert.equal(m, json(out, "{machine_id}"))
    local events = admin:one([[SELECT string_agg(e->>'process' || ':' || (e->>'event'), ' ' ORDER BY n) AS s
      FROM jsonb_array_elements($1::jsonb -> 'events') WITH ORDINALITY AS a(e, n)]], out).s
    assert.equal("Report:Started Report:Finished Broken:Started Broken:Failed Held:Started", events)
    assert.equal("null", admin:one("SELECT jsonb_typeof($1::jsonb #> '{events,0,cause}') AS t", out).t)
  end)

  it("the text forms fit 100 columns, one line per row", function()
    for _, args in ipairs { { "status" }, { "history", m } } do
      local out = host(args)
      local rows = 0
      for line in out:gmatch("[^\n]*") do
        assert.is_true(#line <= 100, "wider than 100 columns: " .. line)
        if line:find(m, 1, true) or line:find("Started", 1, true) then rows = rows + 1 end
      end
      assert.is_true(rows >= 2, out)
    end
    assert.matches("reporter%s+%S+:%d+%s+live", host { "status" })
    assert.matches("line one \"quoted\" xxx.-%.%.%.", host { "status" })
  end)
end)
