-- The shipped examples, run as README tells an operator to run them.
local H = require "support.helpers"
local core = require "bmdb.core"

describe("examples", function()
  local dsn, admin

  local function host(args)
    local argv = { H.bin, "--migrations", H.root .. "/examples/migrations", H.root .. "/examples/" .. args[1] }
    for i = 2, #args do argv[#argv + 1] = args[i] end
    return argv
  end

  setup(function()
    dsn = H.postgres():create_db()
    assert.equal(0, (H.run({ H.bin, "--migrations", H.root .. "/examples/migrations", "migrate" },
      { env = { BMDB_DSN = dsn } })))
    admin = core.connect(dsn)
  end)

  teardown(function() admin:close() end)

  it("seed, provisioner, report-failure and recoverer take machines through their lives", function()
    local code, out, err = H.run(host { "seed.lua" }, { env = { BMDB_DSN = dsn } })
    assert.equal(0, code, err)
    assert.matches("added 5 machines; the fleet has 5", out, 1, true)

    local p = H.spawn { argv = host { "provisioner.lua" }, env = { BMDB_DSN = dsn } }
    H.wait_until(function() return admin:one("SELECT count(*) AS n FROM machine_provided").n == 5 end, 60,
      "every machine to be provisioned")
    p:kill("TERM")
    assert.equal(0, p:wait(30), p:stderr())
    assert.equal(5, admin:one("SELECT count(DISTINCT machine_id) AS n FROM work_history WHERE event = 'Finished'").n)

    code, out, err = H.run(host { "report-failure.lua", "1" }, { env = { BMDB_DSN = dsn } })
    assert.equal(0, code, err)
    local m = admin:one("SELECT machine_id FROM machine_failures").machine_id
    local r = H.spawn { argv = host { "recoverer.lua" }, env = { BMDB_DSN = dsn } }
    H.wait_until(function() return admin:one("SELECT count(*) AS n FROM machine_failures").n == 0 end, 60,
      "the failed machine to be recovered")
    r:kill("TERM")
    assert.equal(0, r:wait(30), r:stderr())
    local h = admin:query([[SELECT event FROM work_history WHERE machine_id = $1 AND process = 'Recover'
                            ORDER BY occurred_at, history_id]], m)
    local seq = {}
    for i, e in ipairs(h) do seq[i] = e.event end
    assert.same({ "Started", "Failed", "Started", "Failed", "Started", "Finished" }, seq)
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
    local code, _, err = H.run(host { "seed.lua", "many" }, { env = { BMDB_DSN = dsn } })
    assert.equal(1, code)
    assert.matches("COUNT a whole number >= 1, got many", err, 1, true)
  end)
end)
