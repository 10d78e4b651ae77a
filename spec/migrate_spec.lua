-- Migrations: applied at start, recorded with a checksum, safe to race.
local H = require "support.helpers"
local core = require "bmdb.core"

describe("migrations", function()
  local pg, dir

  local function host(dsn, args)
    local argv = { H.bin }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    return H.run(argv, { env = { BMDB_DSN = dsn } })
  end

  setup(function()
    pg = H.postgres()
    dir = H.tmpdir("migrate")
    H.write_file(dir .. "/noop.lua", "return\n")
  end)

  it("are applied when a host starts and recorded with a checksum", function()
    local dsn = pg:create_db()
    local code, _, err = host(dsn, { dir .. "/noop.lua" })
    assert.equal(0, code, err)
    local c = core.connect(dsn)
    local row = c:one("SELECT version, name, checksum FROM schema_migrations WHERE version = 1")
    assert.equal("0001_init", row.name)
    assert.matches("^fnv1a64:%x+$", row.checksum)
    assert.equal(1, c:one("SELECT count(*) AS n FROM information_schema.tables WHERE table_name = 'work_backoff'").n)
    c:close()
  end)

  it("migrate status, down N and up manage the schema", function()
    local dsn = pg:create_db()
    local code, out = host(dsn, { "migrate", "up" })
    assert.equal(0, code)
    local known = #H.glob(H.root .. "/migrations/*.up.sql")
    assert.matches(known .. " migrations applied", out, 1, true)
    code, out = host(dsn, { "migrate", "status" })
    assert.equal(0, code)
    assert.matches("0001_init%s+applied", out)
    code, out = host(dsn, { "migrate", "down", "1" })
    assert.equal(0, code, out)
    assert.matches("1 migration rolled back", out, 1, true)
    code, out = host(dsn, { "migrate", "status" })
    local files = H.glob(H.root .. "/migrations/*.up.sql")
    table.sort(files)
    local newest = files[#files]:match("(%d%d%d%d_[%w_]+)%.up%.sql$")
    assert.matches(newest .. "%s+pending", out)
    assert.matches("0001_init%s+applied", out)
    code, out = host(dsn, { "migrate", "down", tostring(known - 1) })
    assert.equal(0, code, out)
    local c = core.connect(dsn)
    assert.equal(0, c:one("SELECT count(*) AS n FROM information_schema.tables WHERE table_name = 'machines'").n)
    code, out = host(dsn, { "migrate", "status" })
    assert.matches("0001_init%s+pending", out)
    code = host(dsn, { "migrate", "down", "1" })
    assert.equal(1, code)
    code = host(dsn, { "migrate", "sideways" })
    assert.equal(2, code)
    c:close()
  end)

  it("refuses to start when an applied migration has changed", function()
    local dsn = pg:create_db()
    assert.equal(0, (host(dsn, { "migrate" })))
    local c = core.connect(dsn)
    c:exec("UPDATE schema_migrations SET checksum = 'fnv1a64:0000000000000000' WHERE version = 1")
    c:close()
    local code, _, err = host(dsn, { dir .. "/noop.lua" })
    assert.equal(1, code)
    assert.matches("migration 0001_init was changed after it was applied", err, 1, true)
  end)

  it("with --no-migrate, refuse a database that is behind", function()
    local dsn = pg:create_db()
    local code, _, err = host(dsn, { "--no-migrate", dir .. "/noop.lua" })
    assert.equal(1, code)
    assert.matches("run bmdb-host migrate up", err, 1, true)
  end)

  describe("of the operator (--migrations DIR)", function()
    local ops

    before_each(function()
      ops = H.tmpdir("ops")
      H.write_file(ops .. "/0001_racks.up.sql", "CREATE TABLE racks (rack TEXT PRIMARY KEY);\n")
      H.write_file(ops .. "/0001_racks.down.sql", "DROP TABLE racks;\n")
    end)

    it("are applied after the core's, recorded and checksummed apart from them", function()
      local dsn = pg:create_db()
      local code, _, err = host(dsn, { "--migrations", ops, dir .. "/noop.lua" })
      assert.equal(0, code, err)
      local c = core.connect(dsn)
      local row = c:one("SELECT name, checksum FROM operator_migrations WHERE version = 1")
      assert.equal("0001_racks", row.name)
      assert.matches("^fnv1a64:%x+$", row.checksum)
      assert.equal("0001_init", c:one("SELECT name FROM schema_migrations WHERE version = 1").name)
      c:exec("INSERT INTO racks VALUES ('r1')")
      c:close()
      local out
      code, out = host(dsn, { "--migrations", ops, "migrate", "status" })
      assert.equal(0, code)
      assert.matches("operator 0001_racks%s+applied", out)
      -- a changed file stops the host, as for the core's
      H.write_file(ops .. "/0001_racks.up.sql", "CREATE TABLE racks (rack TEXT PRIMARY KEY, row INT8);\n")
      code, _, err = host(dsn, { "--migrations", ops, dir .. "/noop.lua" })
      assert.equal(1, code)
      assert.matches("operator migration 0001_racks was changed after it was applied", err, 1, true)
    end)

    it("are refused with a name that is not NNNN_name, before anything runs", function()
      local dsn = pg:create_db()
      H.write_file(ops .. "/racks.up.sql", "SELECT 1;\n")
      local code, _, err = host(dsn, { "--migrations", ops, dir .. "/noop.lua" })
      assert.equal(1, code)
      assert.matches("racks.up.sql: expected NNNN_name.up.sql", err, 1, true)
    end)
  end)

  it("leave the fleet tables of the retired core migration 0003, and their rows, in place", function()
    local dsn = pg:create_db()
    assert.equal(0, (host(dsn, { "migrate" })))
    -- what a database migrated by an older host has: 0003 recorded, its tables and rows
    local c = core.connect(dsn)
    c:exec("CREATE TABLE machine_provided (machine_id UUID NOT NULL PRIMARY KEY REFERENCES machines (machine_id) " ..
           "ON DELETE CASCADE, provider TEXT NOT NULL, provider_id TEXT NOT NULL, " ..
           "provided_at TIMESTAMPTZ NOT NULL DEFAULT now())")
    c:exec("INSERT INTO schema_migrations (version, name, checksum) VALUES (3, '0003_fleet_state', 'fnv1a64:x')")
    local m = c:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
    c:exec("INSERT INTO machine_provided (machine_id, provider, provider_id) VALUES ($1, 'p', 'kept')", m)
    local code, out, err = host(dsn, { "--migrations", H.root .. "/examples/migrations", dir .. "/noop.lua" })
    assert.equal(0, code, err)
    assert.is_nil(err:match("does not know"), err)
    assert.equal("kept", c:one("SELECT provider_id FROM machine_provided WHERE machine_id = $1", m).provider_id)
    code, out = host(dsn, { "migrate", "status" })
    assert.matches("0003_fleet_state%s+applied.*retired", out)
    c:close()
  end)

  it("are safe when several hosts start at once", function()
    local dsn = pg:create_db()
    local procs = {}
    for i = 1, 6 do
      procs[i] = H.spawn { argv = { H.bin, dir .. "/noop.lua" }, env = { BMDB_DSN = dsn } }
    end
    for i = 1, 6 do assert.equal(0, procs[i]:wait(60), procs[i]:stderr()) end
    local c = core.connect(dsn)
    assert.equal(#H.glob(H.root .. "/migrations/*.up.sql"), c:one("SELECT count(*) AS n FROM schema_migrations").n)
    assert.equal(1, c:one("SELECT count(*) AS n FROM schema_migrations WHERE version = 1").n)
    c:close()
  end)
end)
