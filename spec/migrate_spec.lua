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
    assert.matches(string.format("%04d_[%%w_]+%%s+pending", known), out)
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
