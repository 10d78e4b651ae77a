-- An operator's migration without a down file: applied like any other;
-- only rolling it back is refused, naming the missing file.
local H = require "support.helpers"
local core = require "bmdb.core"

describe("an operator migration with no down file", function()
  local dsn, ops

  local function migrate(...)
    return H.run({ H.bin, "--migrations", ops, "migrate", ... }, { env = { BMDB_DSN = dsn } })
  end

  setup(function()
    dsn = H.postgres():create_db()
    ops = H.tmpdir("oneway")
    H.write_file(ops .. "/0001_racks.up.sql", "CREATE TABLE racks (rack TEXT PRIMARY KEY);\n")
    H.write_file(ops .. "/0001_racks.down.sql", "DROP TABLE racks;\n")
    H.write_file(ops .. "/0002_rows.up.sql", "ALTER TABLE racks ADD COLUMN rows INT8;\n")
  end)

  it("is applied by migrate, and listed", function()
    local code, out, err = migrate()
    assert.equal(0, code, err .. out)
    local c = core.connect(dsn)
    assert.equal(2, c:one("SELECT count(*) AS n FROM operator_migrations").n)
    c:exec("INSERT INTO racks (rack, rows) VALUES ('r1', 4)")
    c:close()
    code, out = migrate("status")
    assert.equal(0, code)
    assert.matches("operator 0002_rows%s+applied", out)
  end)

  it("refuses migrate down of it, saying its down file is missing, and changes nothing", function()
    local code, out, err = migrate("down", "1")
    assert.is_not.equal(0, code)
    assert.matches("cannot roll back operator migration 2 (0002_rows): its down file, 0002_rows.down.sql, is missing",
      err .. out, 1, true)
    local c = core.connect(dsn)
    assert.equal(2, c:one("SELECT count(*) AS n FROM operator_migrations").n)
    assert.equal(4, c:one("SELECT rows FROM racks WHERE rack = 'r1'").rows)
    c:close()
  end)

  it("refuses migrate down past it before rolling back any, even newer ones that have a down file", function()
    H.write_file(ops .. "/0003_bays.up.sql", "CREATE TABLE bays (bay TEXT PRIMARY KEY);\n")
    H.write_file(ops .. "/0003_bays.down.sql", "DROP TABLE bays;\n")
    assert.equal(0, (migrate()))
    local code, out, err = migrate("down", "2")
    assert.is_not.equal(0, code)
    assert.matches("its down file, 0002_rows.down.sql, is missing", err .. out, 1, true)
    local c = core.connect(dsn)
    assert.equal(3, c:one("SELECT count(*) AS n FROM operator_migrations").n)
    assert.equal(1, c:one("SELECT count(*) AS n FROM pg_tables WHERE tablename = 'bays'").n)
    c:close()
    assert.equal(0, (migrate("down", "1")))
    os.remove(ops .. "/0003_bays.up.sql")
    os.remove(ops .. "/0003_bays.down.sql")
  end)

  it("still rolls back one that has its down file", function()
    H.write_file(ops .. "/0002_rows.down.sql", "ALTER TABLE racks DROP COLUMN rows;\n")
    local code, out, err = migrate("down", "2")
    assert.equal(0, code, err .. out)
    local c = core.connect(dsn)
    assert.equal(0, c:one("SELECT count(*) AS n FROM operator_migrations").n)
    assert.equal(0, c:one("SELECT count(*) AS n FROM pg_tables WHERE tablename = 'racks'").n)
    c:close()
  end)
end)
