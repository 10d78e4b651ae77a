-- The shipped examples, run as README ("Running it") tells an operator to run them.
local H = require "support.helpers"
local core = require "bmdb.core"
local P = require "support.provider"

describe("examples", function()
  local dsn, admin, provider, dir

  local function host(args)
    local argv = { H.bin, "--migrations", H.root .. "/examples/migrations", H.root .. "/examples/" .. args[1] }
    for i = 2, #args do argv[#argv + 1] = args[i] end
    return argv
  end

  -- The environment an operator gives the examples: the database and the
  -- provider's API.
  local function env(more)
    local e = { BMDB_DSN = dsn, BMDB_PROVIDER_URL = provider.url }
    for k, v in pairs(more or {}) do e[k] = v end
    return e
  end

  local function count(sql, ...) return admin:one("SELECT count(*) AS n FROM " .. sql, ...).n end

  local function events(m, process)
    local seq = {}
    for i, e in ipairs(admin:query([[SELECT event, cause FROM work_history WHERE machine_id = $1 AND process = $2
                                     ORDER BY occurred_at, history_id]], m, process)) do
      seq[i] = e
    end
    return seq
  end

  local function stop(p)
    p:kill("TERM")
    assert.equal(0, p:wait(30), p:stderr())
  end

  setup(function()
    dsn = H.postgres():create_db()
    assert.equal(0, (H.run({ H.bin, "--migrations", H.root .. "/examples/migrations", "migrate" },
      { env = { BMDB_DSN = dsn } })))
    admin = core.connect(dsn)
    provider = P.start()
    dir = H.tmpdir("examples")
  end)

  teardown(function()
    provider:stop()
    admin:close()
  end)

  it("seed, provisioner, initializer, report-failure and recoverer take machines through their lives", function()
    local code, out, err = H.run(host { "seed.lua" }, { env = env() })
    assert.equal(0, code, err)
    assert.matches("added 5 machines; the fleet has 5", out, 1, true)

    -- two provisioner hosts share the work; each machine gets one device
    local p1 = H.spawn { argv = host { "provisioner.lua" }, env = env() }
    local p2 = H.spawn { argv = host { "provisioner.lua" }, env = env() }
    H.wait_until(function() return count("machine_provided") == 5 end, 60, "every machine to be provisioned")
    stop(p1)
    stop(p2)
    assert.equal(5, count("work_history WHERE event = 'Finished' AND process = 'Provision'"))
    assert.equal(5, provider:stats().devices)
    for _, row in ipairs(admin:query("SELECT machine_id, provider_id FROM machine_provided")) do
      local status, _, body = provider:get("/devices/" .. row.provider_id)
      assert.equal(200, status)
      assert.matches('"machine":"' .. row.machine_id .. '"', body, 1, true)
    end

    local i = H.spawn { argv = host { "initializer.lua" }, env = env() }
    H.wait_until(function() return count("machine_initialized") == 5 end, 60, "every machine to be initialized")
    stop(i)
    assert.equal(5, count([[machine_initialized i JOIN machine_provided p USING (machine_id)
      WHERE i.agent_version = '1.0' AND i.output = 'agent 1.0 installed on ' || i.machine_id || ' (device ' || p.provider_id || ')' || chr(10)]]))

    -- The provider answers every request 503 until the machine failed
    -- twice: the recoverer backs off (2 s, then 4 s) and retries.
    code, out, err = H.run(host { "report-failure.lua", "1" }, { env = env() })
    assert.equal(0, code, err)
    local m = admin:one("SELECT machine_id FROM machine_failures").machine_id
    local device = admin:one("SELECT provider_id FROM machine_provided WHERE machine_id = $1", m).provider_id
    provider:config { fail_every = 1 }
    local r = H.spawn { argv = host { "recoverer.lua" }, env = env() }
    H.wait_until(function() return count("work_history WHERE machine_id = $1 AND event = 'Failed'", m) >= 2 end, 60,
      "two failed reboots")
    provider:config { fail_every = 0 }
    H.wait_until(function() return count("machine_failures") == 0 end, 60, "the failed machine to be recovered")
    stop(r)
    local seq = events(m, "Recover")
    assert.is_true(#seq >= 6, "at least two failures and a finish")
    for k, e in ipairs(seq) do
      if k % 2 == 1 then
        assert.equal("Started", e.event)
      elseif k < #seq then
        assert.equal("Failed", e.event)
        assert.equal("provider: POST /devices/" .. device .. "/reboot answered 503 (provider unavailable)",
          e.cause:match("^[^\n]*")) -- then the traceback
      else
        assert.equal("Finished", e.event)
      end
    end
    assert.matches('"state":"rebooting"', select(3, provider:get("/devices/" .. device)), 1, true)
  end)

  it("reconciler: one of two hosts runs the loop; it adopts a device the BMDB does not record", function()
    local fleet = H.postgres():create_db()
    assert.equal(0, (H.run({ H.bin, "--migrations", H.root .. "/examples/migrations", "migrate" },
      { env = { BMDB_DSN = fleet } })))
    local c = core.connect(fleet)
    local lost = c:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
    local recorded = c:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
    -- a create that landed at the provider while its item never committed,
    -- one the BMDB recorded, and one for a machine the BMDB does not know
    local status, _, body = provider:post("/devices", '{"machine":"' .. lost .. '"}')
    assert.equal(201, status, body)
    local device = body:match('"id":"([^"]+)"')
    status, _, body = provider:post("/devices", '{"machine":"' .. recorded .. '"}')
    assert.equal(201, status, body)
    c:exec("INSERT INTO machine_provided (machine_id, provider, provider_id) VALUES ($1, 'fake', $2)", recorded,
           body:match('"id":"([^"]+)"'))
    assert.equal(201, (provider:post("/devices", '{"machine":"00000000-0000-4000-8000-000000000000"}')))
    local e = { BMDB_DSN = fleet, BMDB_PROVIDER_URL = provider.url, BMDB_RECONCILE_EVERY = "0.5" }
    local r1 = H.spawn { argv = host { "reconciler.lua" }, env = e }
    local r2 = H.spawn { argv = host { "reconciler.lua" }, env = e }
    H.wait_until(function()
      return c:one("SELECT count(*) AS n FROM loop_history WHERE name = 'provider-reconcile' AND event = 'Finished'").n >= 3
    end, 60, "three reconcile runs")
    assert.equal(device, c:one("SELECT provider_id FROM machine_provided WHERE machine_id = $1", lost).provider_id)
    assert.equal(2, c:one("SELECT count(*) AS n FROM machine_provided").n)
    -- every run was the one holder's
    assert.equal(1, c:one([[SELECT count(DISTINCT session_id) AS n FROM loop_history
                            WHERE name = 'provider-reconcile' AND event = 'Started']]).n)
    stop(r1)
    stop(r2)
    local log = r1:stderr() .. r2:stderr()
    -- (fields in the order of their names; the provider is shared with
    -- the other examples, whose devices are for other databases' machines)
    assert.matches('msg=reconciled adopted=1 attempt=%d+ devices=%d+ unknown=[1-9]', log)
    assert.matches('msg=reconciled adopted=0 attempt=%d+ devices=%d+ unknown=[1-9]', log)
    c:close()
  end)

  it("the initializer fails a command's non-zero exit with its stderr, and stops one at its timeout", function()
    local fleet = H.postgres():create_db()
    assert.equal(0, (H.run({ H.bin, "--migrations", H.root .. "/examples/migrations", "migrate" },
      { env = { BMDB_DSN = fleet } })))
    local c = core.connect(fleet)
    local failing = c:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
    local hanging = c:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
    c:exec("INSERT INTO machine_provided (machine_id, provider, provider_id) VALUES ($1, 'fake', 'dev-a'), ($2, 'fake', 'dev-b')",
      failing, hanging)
    -- stands in for `ssh root@HOST agent-install`: one host refuses, the
    -- other never answers
    local pidfile = dir .. "/hanging.pid"
    local cmd = dir .. "/agent-install"
    H.write_file(cmd, "#!/bin/sh\n" ..
      "if [ \"$1\" = " .. failing .. " ]; then echo \"ssh: connect to host $1 port 22: Connection refused\" >&2; exit 255; fi\n" ..
      "echo $$ > " .. pidfile .. "\nexec sleep 600\n")
    assert.equal(0, (H.run { "chmod", "+x", cmd }))
    local i = H.spawn { argv = host { "initializer.lua" },
                        env = { BMDB_DSN = fleet, BMDB_AGENT_INSTALL = cmd, BMDB_AGENT_TIMEOUT = "1" } }
    H.wait_until(function()
      return c:one("SELECT count(*) AS n FROM work_history WHERE event = 'Failed' AND process = 'Initialize'").n == 2
    end, 60, "both machines' initialization to fail")
    stop(i)
    local cause = {}
    for _, row in ipairs(c:query("SELECT machine_id, cause FROM work_history WHERE event = 'Failed'")) do
      cause[row.machine_id] = row.cause
    end
    assert.equal("agent-install exited 255: ssh: connect to host " .. failing .. " port 22: Connection refused",
      cause[failing])
    assert.matches("exec " .. cmd .. ": timed out after 1s; its process group was terminated", cause[hanging], 1, true)
    local pid = tonumber(H.read_file(pidfile))
    assert.is_number(pid)
    assert.is_false(H.signal(pid, 0), "the command outlived its timeout")
    assert.equal(0, c:one("SELECT count(*) AS n FROM machine_initialized").n)
    c:close()
  end)

  -- An operator copies these selects to fleets of any size: the
  -- provisioner's must walk an index in its order, not sort every machine
  -- for each claim (examples/migrations/0002).
  it("the provisioner's select walks an index at a hundred thousand machines", function()
    local fleet = H.postgres():create_db()
    assert.equal(0, (H.run({ H.bin, "--migrations", H.root .. "/examples/migrations", "migrate" },
      { env = { BMDB_DSN = fleet } })))
    local c = core.connect(fleet)
    c:exec("INSERT INTO machines (created_at) SELECT now() - g * interval '1 second' FROM generate_series(1, 100000) g")
    c:exec("ANALYZE machines")
    local saved = package.path
    package.path = H.root .. "/examples/?.lua;" .. package.path
    local workers = dofile(H.root .. "/examples/provisioner.lua")
    package.path = saved
    local sql, args
    workers[1].select({ query = function(_, text, ...) sql, args = text, { ... } return {} end }, 16)
    local plan = c:one("EXPLAIN (FORMAT JSON) " .. sql, unpack(args))["QUERY PLAN"]
    c:close()
    assert.matches('"Index Name": "machines_created_at"', plan, 1, true)
    assert.is_nil(plan:find('"Node Type": "Sort"', 1, true), plan)
  end)

  it("seed rejects a bad count with a clear error", function()
    local code, _, err = H.run(host { "seed.lua", "many" }, { env = env() })
    assert.equal(1, code)
    assert.matches("COUNT a whole number >= 1, got many", err, 1, true)
  end)
end)
