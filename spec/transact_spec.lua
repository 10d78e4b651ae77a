-- bmdb.transact: typed results, parameters, error objects, retries.
local H = require "support.helpers"
local bmdb = require "bmdb"
local core = require "bmdb.core"

local failure = H.failure

describe("bmdb.transact", function()
  local dsn, admin

  setup(function() dsn, admin = H.open_core("transact_spec") end)

  teardown(function() H.close_core(admin) end)

  it("returns typed rows: integers, floats, booleans, text, uuid, NULL", function()
    local row = bmdb.transact(function(tx)
      return tx:one([[SELECT 42::INT8 AS i, 2.5::FLOAT8 AS f, true AS b, 'x'::TEXT AS t,
                             gen_random_uuid() AS u, NULL::TEXT AS n,
                             9007199254740993::INT8 AS big, 1.25::NUMERIC AS num]])
    end)
    assert.equal(42, row.i)
    assert.equal(2.5, row.f)
    assert.equal(true, row.b)
    assert.equal("x", row.t)
    assert.truthy(core.valid_uuid(row.u))
    assert.is_nil(row.n)
    assert.equal("9007199254740993", row.big) -- beyond 2^53 stays exact, as text
    assert.equal(1.25, row.num)
  end)

  it("sends every Lua type it accepts as a parameter, never spliced", function()
    local row = bmdb.transact(function(tx)
      return tx:one("SELECT $1::INT8 AS i, $2::FLOAT8 AS f, $3::BOOLEAN AS b, $4::TEXT AS t, $5::TEXT AS n",
                    7, 0.125, false, "it's; DROP TABLE machines --", nil)
    end)
    assert.same({ i = 7, f = 0.125, b = false, t = "it's; DROP TABLE machines --" }, row)
  end)

  it("query returns every row, one returns nil on none, exec the count", function()
    local ids = bmdb.transact(function(tx)
      local out = {}
      for _ = 1, 3 do
        out[#out + 1] = tx:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
      end
      return out
    end)
    local rows, none, n = bmdb.transact(function(tx)
      return tx:query("SELECT machine_id FROM machines WHERE machine_id = ANY($1::UUID[]) ORDER BY 1",
                      "{" .. table.concat(ids, ",") .. "}"),
             tx:one("SELECT 1 AS x WHERE false"),
             tx:exec("DELETE FROM machines WHERE machine_id = ANY($1::UUID[])",
                     "{" .. table.concat(ids, ",") .. "}")
    end)
    assert.equal(3, #rows)
    assert.is_nil(none)
    assert.equal(3, n)
  end)

  it("refuses a one() that matches several rows", function()
    local err = failure(bmdb.transact, function(tx)
      return tx:one("SELECT generate_series(1, 3) AS x")
    end)
    assert.matches("one: the query returned 3 rows, expected at most one", tostring(err), 1, true)
    assert.truthy(bmdb.is_error(err, "usage"), tostring(err))
  end)

  it("raises SQL errors as objects with sqlstate, message and a readable tostring", function()
    local err = failure(bmdb.transact, function(tx)
      tx:exec("INSERT INTO work_history (machine_id, process, session_id, event) VALUES ($1, 'P', $1, 'Nonsense')",
              "00000000-0000-0000-0000-000000000001")
    end)
    assert.truthy(bmdb.is_error(err, "sql"))
    assert.equal("23514", err.sqlstate)
    assert.matches("check constraint", err.message)
    assert.matches("^SQL error 23514: ", tostring(err))
  end)

  it("names a missing parameter, an extra argument and an unsupported type", function()
    local err = failure(bmdb.transact, function(tx) return tx:one("SELECT $1::INT8 + $2::INT8 AS s", 1) end)
    assert.matches("parameter $2 is missing", tostring(err), 1, true)
    err = failure(bmdb.transact, function(tx) return tx:one("SELECT $1::INT8 AS s", 1, 2) end)
    assert.matches("bad argument #3 to 'one' (no parameter $2: the query uses 1 parameter, got 2)", tostring(err), 1, true)
    err = failure(bmdb.transact, function(tx) return tx:one("SELECT $1::TEXT AS s", {}) end)
    assert.matches("bad argument #2 to 'one' (parameter $1: unsupported type table", tostring(err), 1, true)
    assert.truthy(bmdb.is_error(err, "usage"), tostring(err))
    -- "$1" inside a literal or comment is not a parameter
    local row = bmdb.transact(function(tx) return tx:one("SELECT '$1' AS s -- $2") end)
    assert.equal("$1", row.s)
  end)

  it("rolls back everything when the function raises", function()
    local before = admin:one("SELECT count(*) AS n FROM machines").n
    failure(bmdb.transact, function(tx)
      tx:exec("INSERT INTO machines DEFAULT VALUES")
      error("changed my mind")
    end)
    assert.equal(before, admin:one("SELECT count(*) AS n FROM machines").n)
  end)

  -- tx:defer queues a statement without waiting for its answer: it rides
  -- with the next statement's flight, or with COMMIT (docs/api.md, "Deferred
  -- statements").
  describe("tx:defer", function()
    setup(function()
      admin:exec("CREATE TABLE deferred_t (k INT8 PRIMARY KEY, v TEXT, b BYTEA)")
    end)

    before_each(function() admin:exec("DELETE FROM deferred_t") end)

    it("runs deferred statements in order, before the next statement and at commit", function()
      local seen = bmdb.transact(function(tx)
        tx:defer("INSERT INTO deferred_t (k, v) VALUES ($1, $2)", 1, "a")
        tx:defer("UPDATE deferred_t SET v = v || $2 WHERE k = $1", 1, "b")
        local v = tx:one("SELECT v FROM deferred_t WHERE k = 1").v
        -- only deferred statements after the last one: they ride with COMMIT
        tx:defer("INSERT INTO deferred_t (k, v, b) VALUES ($1, $2, $3)", 2, nil, "x\0y")
        tx:defer("UPDATE deferred_t SET v = v || $2 WHERE k = $1", 1, "c")
        return v
      end)
      assert.equal("ab", seen)
      assert.equal("abc", admin:one("SELECT v FROM deferred_t WHERE k = 1").v)
      local two = admin:one("SELECT v IS NULL AS null_v, b FROM deferred_t WHERE k = 2")
      assert.is_true(two.null_v)
      assert.equal("x\0y", two.b)
    end)

    it("commits a transaction of deferred statements only", function()
      bmdb.transact(function(tx)
        for k = 1, 3 do tx:defer("INSERT INTO deferred_t (k) VALUES ($1)", k) end
      end)
      assert.equal(3, admin:one("SELECT count(*) AS n FROM deferred_t").n)
    end)

    it("raises a deferred statement's failure from the next statement, naming it; nothing commits", function()
      local err = failure(bmdb.transact, function(tx)
        tx:defer("INSERT INTO deferred_t (k) VALUES ($1)", 1)
        tx:defer("INSERT INTO deferred_t (k) VALUES ($1)", 1)
        tx:one("SELECT 1 AS x")
        error("not reached: the statement above raises")
      end)
      assert.truthy(bmdb.is_error(err, "sql"), tostring(err))
      assert.equal("23505", err.sqlstate)
      assert.is_true(err.deferred)
      assert.matches("deferred with tx:defer: INSERT INTO deferred_t", err.message, 1, true)
      assert.equal(0, admin:one("SELECT count(*) AS n FROM deferred_t").n)
    end)

    it("raises a deferred statement's failure from the commit; nothing commits", function()
      local err = failure(bmdb.transact, function(tx)
        tx:exec("INSERT INTO deferred_t (k) VALUES (1)")
        tx:defer("INSERT INTO deferred_t (k) VALUES ($1)", 2)
        tx:defer("SELECT 1 / (k - k) FROM deferred_t WHERE k = $1", 2)
      end)
      assert.equal("22012", err.sqlstate, tostring(err))
      assert.is_true(err.deferred)
      assert.equal(0, admin:one("SELECT count(*) AS n FROM deferred_t").n)
    end)

    it("raises an error in a deferred statement's text at once, and refuses transaction control", function()
      local err = failure(bmdb.transact, function(tx)
        local ok, e = pcall(tx.defer, tx, "SELEC 1")
        assert.is_false(ok)
        error(e, 0)
      end)
      assert.equal("42601", err.sqlstate, tostring(err))
      assert.is_nil(err.deferred)
      err = failure(bmdb.transact, function(tx) tx:defer("COMMIT") end)
      assert.truthy(bmdb.is_error(err, "usage"), tostring(err))
      assert.matches("defer: COMMIT is refused", tostring(err), 1, true)
      err = failure(bmdb.transact, function(tx) tx:defer("SELECT $1::INT8", 1, 2) end)
      assert.matches("bad argument #3 to 'defer' (no parameter $2", tostring(err), 1, true)
    end)

    it("runs them at once when the queue is full, and keeps their order", function()
      bmdb.transact(function(tx)
        tx:defer("INSERT INTO deferred_t (k, v) VALUES (0, '')")
        for i = 1, 300 do tx:defer("UPDATE deferred_t SET v = v || $1 WHERE k = 0", tostring(i % 10)) end
      end)
      local want = {}
      for i = 1, 300 do want[i] = tostring(i % 10) end
      assert.equal(table.concat(want), admin:one("SELECT v FROM deferred_t WHERE k = 0").v)
    end)
  end)

  it("refuses a tx used after its function returned", function()
    local kept = bmdb.transact(function(tx) return tx end)
    local err = failure(kept.one, kept, "SELECT 1 AS x")
    assert.matches("the transaction is over", tostring(err), 1, true)
    assert.truthy(bmdb.is_error(err, "closed"), tostring(err))
  end)

  it("retries a serialization failure and commits once", function()
    local m = admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
    admin:exec("CREATE TABLE IF NOT EXISTS counters (machine_id UUID PRIMARY KEY, n INT8 NOT NULL)")
    admin:exec("INSERT INTO counters VALUES ($1, 0)", m)
    local attempts = 0
    bmdb.transact(function(tx)
      attempts = attempts + 1
      local n = tx:one("SELECT n FROM counters WHERE machine_id = $1", m).n
      if attempts == 1 then
        -- another client commits a write to the row we read: our write must fail with 40001
        admin:exec("UPDATE counters SET n = n + 100 WHERE machine_id = $1", m)
      end
      tx:exec("UPDATE counters SET n = $2 WHERE machine_id = $1", m, n + 1)
    end)
    assert.equal(2, attempts)
    assert.equal(101, admin:one("SELECT n FROM counters WHERE machine_id = $1", m).n)
  end)

  it("gives up on a conflict that never clears, raising 40001", function()
    local m = admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
    admin:exec("INSERT INTO counters VALUES ($1, 0)", m)
    local attempts = 0
    local window = require("bmdb.internal").retry_seconds
    require("bmdb.internal").retry_seconds = 1 -- retries are bounded by time (30 s); keep this spec short
    local err = failure(bmdb.transact, function(tx)
      attempts = attempts + 1
      tx:one("SELECT n FROM counters WHERE machine_id = $1", m)
      admin:exec("UPDATE counters SET n = n + 1 WHERE machine_id = $1", m)
      tx:exec("UPDATE counters SET n = -1 WHERE machine_id = $1", m)
    end)
    require("bmdb.internal").retry_seconds = window
    assert.equal("40001", err.sqlstate)
    assert.is_true(attempts > 1, "retried, got " .. attempts)
    assert.equal(attempts, admin:one("SELECT n FROM counters WHERE machine_id = $1", m).n)
  end)
end)
