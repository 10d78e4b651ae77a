-- Values in and out of SQL: transaction control refused inside transact,
-- NUL bytes, float texts, numeric results, E'' strings.
local H = require "support.helpers"
local bmdb = require "bmdb"

local failure = H.failure

describe("values", function()
  local admin

  setup(function()
    local _
    _, admin = H.open_core("values_spec")
    admin:exec("CREATE TABLE blobs (id INT8 PRIMARY KEY, b BYTEA, t TEXT)")
  end)

  teardown(function() H.close_core(admin) end)

  local function machine_kept(id)
    return admin:one("SELECT count(*) AS n FROM machines WHERE machine_id = $1", id).n == 1
  end

  describe("transaction control inside transact", function()
    local refused = {
      { "COMMIT", "COMMIT" }, { "commit and chain", "COMMIT" }, { "ROLLBACK", "ROLLBACK" },
      { "  rollback;", "ROLLBACK" }, { ";ROLLBACK", "ROLLBACK" }, { "/* x */ ROLLBACK", "ROLLBACK" },
      { "/* a /* nested */ b */ Rollback", "ROLLBACK" }, { "-- note\n\tROLLBACK", "ROLLBACK" },
      { "BEGIN", "BEGIN" }, { "START TRANSACTION", "START TRANSACTION" }, { "END", "END" }, { "ABORT", "ABORT" },
      { "SAVEPOINT s", "SAVEPOINT" }, { "RELEASE SAVEPOINT s", "RELEASE" },
      { "ROLLBACK TO SAVEPOINT s", "ROLLBACK" }, { "PREPARE TRANSACTION 'x'", "PREPARE TRANSACTION" },
      { "COMMIT PREPARED 'x'", "COMMIT" }, { "ROLLBACK PREPARED 'x'", "ROLLBACK" },
      { "SET TRANSACTION ISOLATION LEVEL READ COMMITTED", "SET TRANSACTION" },
      { "set /**/ transaction read write", "SET TRANSACTION" },
    }
    for _, case in ipairs(refused) do
      local sql, name = case[1], case[2]
      it(string.format("refuses %q, and an INSERT after it is not kept when the function raises", sql), function()
        local id
        local err = failure(bmdb.transact, function(tx)
          local before = tx:one("SELECT txid_current() AS x").x
          for _, method in ipairs { "exec", "query", "one" } do
            local ok, e = pcall(tx[method], tx, sql)
            assert.is_false(ok)
            assert.truthy(bmdb.is_error(e, "usage"), tostring(e))
            assert.matches(method .. ": " .. name .. " is refused inside bmdb.transact", e.message, 1, true)
          end
          -- still the same, fenced transaction: nothing ran in autocommit
          assert.equal(before, tx:one("SELECT txid_current() AS x").x)
          id = tx:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
          error("body failed")
        end)
        assert.matches("body failed", tostring(err))
        assert.is_false(machine_kept(id))
      end)
    end

    it("still runs statements that merely mention those words", function()
      local row = bmdb.transact(function(tx)
        tx:exec("SET LOCAL lock_timeout = '5s'")
        return tx:one("SELECT 'COMMIT' AS w, 1 AS end_of, current_setting('lock_timeout') AS lt")
      end)
      assert.same({ w = "COMMIT", end_of = 1, lt = "5s" }, row)
    end)

    it("a refused ROLLBACK raises, so nothing after it runs and nothing before it commits", function()
      local id
      failure(bmdb.transact, function(tx)
        id = tx:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
        tx:exec("ROLLBACK") -- raises: the transaction is not ended behind the host's back
        tx:exec("INSERT INTO machines (machine_id) VALUES (gen_random_uuid())")
      end)
      assert.is_false(machine_kept(id))
    end)
  end)

  describe("NUL bytes", function()
    it("a bytea parameter keeps every byte, and a bytea result comes back as those bytes", function()
      local all = {}
      for i = 0, 255 do all[#all + 1] = string.char(i) end
      all = table.concat(all)
      bmdb.transact(function(tx)
        tx:exec("INSERT INTO blobs (id, b) VALUES (1, $1), (2, $2), (3, $3)", "a\0b", all, "plain")
      end)
      local rows = admin:query("SELECT id, b, length(b) AS n FROM blobs WHERE id <= 3 ORDER BY id")
      assert.equal(3, rows[1].n)
      assert.equal("a\0b", rows[1].b)
      assert.equal(256, rows[2].n)
      assert.equal(all, rows[2].b)
      assert.equal("plain", rows[3].b)
      local back = bmdb.transact(function(tx) return tx:one("SELECT b FROM blobs WHERE id = 2").b end)
      assert.equal(all, back)
    end)

    it("a text parameter with a NUL is refused with an error naming the parameter", function()
      local err = failure(bmdb.transact, function(tx)
        tx:exec("INSERT INTO blobs (id, t) VALUES ($1, $2)", 10, "ab\0cd")
      end)
      assert.truthy(bmdb.is_error(err, "sql"))
      assert.matches("parameter $2 holds a NUL byte, which only a bytea parameter can take "
                     .. "(the statement reads $2 as text)", err.message, 1, true)
      assert.equal(0, admin:one("SELECT count(*) AS n FROM blobs WHERE id = 10").n)
      -- another type never reads the bytes as its binary form (four bytes
      -- are an integer); the same on a plain connection
      err = failure(admin.one, admin, "SELECT $1::INT4 AS i", "1\0\0\0")
      assert.matches("parameter $1 holds a NUL byte, which only a bytea parameter can take "
                     .. "(the statement reads $1 as integer)", err.message, 1, true)
    end)
  end)

  describe("floats sent", function()
    it("as the shortest text that reads back: 0.1 into numeric stays 0.1", function()
      local row = bmdb.transact(function(tx)
        return tx:one("SELECT $1::NUMERIC::TEXT AS n, $2::NUMERIC::TEXT AS m", 0.1, 1 / 3)
      end)
      assert.equal("0.1", row.n)
      assert.equal("0.3333333333333333", row.m)
    end)

    it("keep the sign of -0 in a float8", function()
      local row = bmdb.transact(function(tx) return tx:one("SELECT $1::FLOAT8 AS f, $1::FLOAT8::TEXT AS t", -0.0) end)
      assert.equal("-0", row.t)
      assert.equal(-math.huge, 1 / row.f)
    end)

    it("round-trip exactly through float8 and numeric", function()
      local doubles = { 0.1, 0.2, 0.30000000000000004, 1 / 3, 2 / 3, math.pi, -math.exp(1), 1e-300,
        5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 123456.789, -2.5e-7, 1e21, 1e22,
        9007199254740993, 2 ^ 63, 2 ^ 70 + 2 ^ 20, 4.35, 0.1 + 0.7, 1 - 2 ^ -53, -0.0 }
      for _, d in ipairs(doubles) do
        local row = bmdb.transact(function(tx) return tx:one("SELECT $1::FLOAT8 AS f, $2::NUMERIC AS n", d, d) end)
        assert.equal(d, row.f, string.format("float8 %.17g", d))
        assert.equal(d, tonumber(row.n), string.format("numeric %.17g came back as %s", d, tostring(row.n)))
        assert.equal("number", type(row.n), string.format("numeric %.17g came back as %q", d, tostring(row.n)))
      end
    end)
  end)

  describe("numeric results", function()
    it("are numbers when the double is that value, else the exact text", function()
      local row = bmdb.transact(function(tx)
        return tx:one([[SELECT 0.1::NUMERIC AS a, 1.2500::NUMERIC AS b, -2.5::NUMERIC AS c, 0.000::NUMERIC AS z,
                               1e20::NUMERIC AS big, 0.10000000000000001::NUMERIC AS close,
                               9007199254740993::NUMERIC AS odd, 123456789012345678901234567890::NUMERIC AS huge,
                               1e400::NUMERIC AS over, 'NaN'::NUMERIC AS nan, 12.340::NUMERIC(10, 3) AS scaled]])
      end)
      assert.equal(0.1, row.a)
      assert.equal(1.25, row.b)
      assert.equal(-2.5, row.c)
      assert.equal(0, row.z)
      assert.equal(1e20, row.big)
      assert.equal("0.10000000000000001", row.close)
      assert.equal("9007199254740993", row.odd)
      assert.equal("123456789012345678901234567890", row.huge)
      assert.equal("1" .. string.rep("0", 400), row.over)
      assert.equal("number", type(row.nan))
      assert.is_true(row.nan ~= row.nan)
      assert.equal(12.34, row.scaled)
    end)
  end)

  describe("parameters in E'' strings", function()
    it("a backslash-escaped quote does not end the literal, so $2 inside it is text", function()
      local row = bmdb.transact(function(tx)
        return tx:one([[SELECT E'it\'s $2' AS s, e'\\' AS b, U&'d\0061$3' AS u, $1::INT8 AS n]], 5)
      end)
      assert.same({ s = "it's $2", b = "\\", u = "da$3", n = 5 }, row)
    end)

    it("an E'' string continued on the next line keeps its escapes", function()
      local row = bmdb.transact(function(tx)
        return tx:one("SELECT E'a'\n'\\' $2' AS s, $1::INT8 AS n", 7)
      end)
      assert.same({ s = "a' $2", n = 7 }, row)
    end)

    it("a real parameter after an E'' string is still counted", function()
      local err = failure(bmdb.transact, function(tx) return tx:one([[SELECT E'\'' AS q, $1::INT8 AS n]]) end)
      assert.matches("parameter $1 is missing", tostring(err), 1, true)
    end)
  end)
end)
