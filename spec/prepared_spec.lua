-- Prepared statements: each statement a transaction sends is parsed once
-- per connection, and the cache never surfaces as an error of its own.
local H = require "support.helpers"
local bmdb = require "bmdb"

describe("prepared statements", function()
  local admin

  setup(function() _, admin = H.open_core("prepared_spec") end)
  teardown(function() H.close_core(admin) end)

  local function prepared_here(tx, text)
    return tx:one("SELECT count(*) AS n FROM pg_prepared_statements WHERE statement = $1", text).n
  end

  it("prepares a repeated statement once on its connection", function()
    local text = "SELECT $1::INT8 + 1 AS n"
    for i = 1, 5 do
      assert.equal(i + 1, bmdb.transact(function(tx) return tx:one(text, i).n end))
    end
    assert.equal(1, bmdb.transact(function(tx) return prepared_here(tx, text) end))
  end)

  it("reports a statement's own error, not the cache's", function()
    local err = H.failure(bmdb.transact, function(tx) tx:exec("SELEC 1") end)
    assert.equal("42601", err.sqlstate)
  end)

  it("runs a statement again after a migration changed the table under it", function()
    admin:exec("CREATE TABLE shapes (id INT8 PRIMARY KEY)")
    admin:exec("INSERT INTO shapes VALUES (1)")
    local function read() return bmdb.transact(function(tx) return tx:one("SELECT * FROM shapes") end) end
    assert.same({ id = 1 }, read())
    assert.same({ id = 1 }, read())
    admin:exec("ALTER TABLE shapes ADD COLUMN name TEXT NOT NULL DEFAULT 'square'")
    assert.same({ id = 1, name = "square" }, read())
  end)

  it("recovers when a script drops the connection's prepared statements", function()
    local text = "SELECT 41 + 1 AS n"
    assert.equal(42, bmdb.transact(function(tx) return tx:one(text).n end))
    bmdb.transact(function(tx) tx:exec("DEALLOCATE ALL") end)
    assert.equal(42, bmdb.transact(function(tx) return tx:one(text).n end))
  end)
end)
