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
    assert.equal("sessions,work,paused,holds,backoffs", admin:one(
      "SELECT string_agg(k, ',' ORDER BY CASE k WHEN 'sessions' THEN 1 WHEN 'work' THEN 2 " ..
      "WHEN 'paused' THEN 3 WHEN 'holds' THEN 4 ELSE 5 END) AS k " ..
      "FROM jsonb_object_keys($1::jsonb) AS k", out).k)
    assert.equal("running", json(out, "{work,0,state}"))
    assert.equal("reporter", json(out, "{sessions,0,component}"))
    assert.equal("live", json(out, "{sessions,0,state}"))
    assert.equal(m, json(out, "{work,0,machine_id}"))
    assert.equal("Held", json(out, "{work,0,process}"))
    assert.equal("Broken", json(out, "{backoffs,0,process}"))
    assert.equal("number", admin:one("SELECT jsonb_typeof($1::jsonb #> '{backoffs,0,attempts}') AS t", out).t)
    assert.equal("line one\n\"quoted\" " .. string.rep("x", 300), json(out, "{backoffs,0,cause}"))
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
