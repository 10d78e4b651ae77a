-- The policies of bmdb.lua: nesting, retries, refused values, work items
-- that bodies cannot corrupt, readable causes.
local H = require "support.helpers"
local bmdb = require "bmdb"
local core = require "bmdb.core"

local failure = H.failure
local NAN, INF = 0 / 0, math.huge

-- a value as a spec's title shows it
local function show(v)
  if type(v) ~= "table" then return tostring(v):gsub("%-nan", "nan") end
  local parts = {}
  for k, x in pairs(v) do parts[#parts + 1] = k .. "=" .. show(x) end
  return "{" .. table.concat(parts, ", ") .. "}"
end

describe("bmdb policies", function()
  local dsn, admin

  local function machine()
    return admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
  end

  local function last_event(m, process)
    return admin:one([[SELECT event, cause FROM work_history WHERE machine_id = $1 AND process = $2
                       ORDER BY occurred_at DESC, history_id DESC LIMIT 1]], m, process)
  end

  setup(function()
    dsn, admin = H.open_core("policy_spec")
    -- Without the nesting check an inner transaction waits on its outer
    -- one for good; a lock timeout turns that hang into a failure.
    admin:exec([[DO $$ BEGIN
      EXECUTE format('ALTER DATABASE %I SET lock_timeout = ''10s''', current_database());
    END $$]])
    admin:exec("CREATE TABLE counters (machine_id UUID PRIMARY KEY, n INT8 NOT NULL)")
  end)

  teardown(function() H.close_core(admin) end)

  describe("nested transactions", function()
    it("are refused with a 'nested' error that says what to do, and the outer one carries on", function()
      local m = machine()
      local inner_ok, inner_err
      local n = bmdb.transact(function(tx)
        tx:exec("INSERT INTO counters VALUES ($1, 1)", m)
        -- the inner transaction touches the row the outer one wrote
        inner_ok, inner_err = pcall(bmdb.transact, function(tx2)
          tx2:exec("UPDATE counters SET n = n + 10 WHERE machine_id = $1", m)
        end)
        tx:exec("UPDATE counters SET n = n + 1 WHERE machine_id = $1", m)
        return tx:one("SELECT n FROM counters WHERE machine_id = $1", m).n
      end)
      assert.is_false(inner_ok)
      assert.truthy(bmdb.is_error(inner_err, "nested"), tostring(inner_err))
      assert.matches("use the tx you have", tostring(inner_err), 1, true)
      assert.equal(2, n)
      assert.equal(2, admin:one("SELECT n FROM counters WHERE machine_id = $1", m).n)
    end)

    it("are refused for every bmdb call that would open one: work, lock, finish", function()
      local m = machine()
      bmdb.transact(function()
        assert.truthy(bmdb.is_error(failure(bmdb.work, m, "Nested", function() end), "nested"))
      end)
      -- w:finish inside a transaction of the body
      local err = failure(bmdb.work, m, "Nested", function(w)
        bmdb.transact(function() w:finish() end)
      end)
      assert.truthy(bmdb.is_error(err, "nested"), tostring(err))
      -- the raise failed the item: the lock was released
      assert.equal("Failed", last_event(m, "Nested").event)
      assert.equal(0, admin:one("SELECT count(*) AS n FROM work WHERE machine_id = $1", m).n)
    end)

    it("leave the state usable: the next transaction runs", function()
      pcall(bmdb.transact, function() bmdb.transact(function() end) end)
      assert.equal(1, bmdb.transact(function(tx) return tx:one("SELECT 1 AS x").x end))
    end)

    it("a transaction a body leaves open in an abandoned coroutine is rolled back when the body ends", function()
      local m = machine()
      bmdb.work(m, "Abandon", function()
        local co = coroutine.create(function()
          bmdb.transact(function(tx)
            tx:exec("INSERT INTO counters VALUES ($1, 99)", m)
            coroutine.yield()
          end)
        end)
        assert(coroutine.resume(co))
        -- co is never resumed; its transaction is still open here
        assert.truthy(bmdb.is_error(failure(bmdb.transact, function() end), "nested"))
      end)
      -- the item was finished, the abandoned write rolled back, the state is usable
      assert.equal("Finished", last_event(m, "Abandon").event)
      assert.equal(0, admin:one("SELECT count(*) AS n FROM counters WHERE machine_id = $1", m).n)
      assert.equal(1, bmdb.transact(function(tx) return tx:one("SELECT 1 AS x").x end))
    end)

    it("bmdb.wake inside a transaction rides on it instead of failing", function()
      local m = machine()
      local woke = bmdb.transact(function(tx)
        tx:exec("INSERT INTO counters VALUES ($1, 5)", m)
        return bmdb.wake("Provision")
      end)
      assert.is_true(woke)
      assert.equal(5, admin:one("SELECT n FROM counters WHERE machine_id = $1", m).n)
    end)
  end)

  describe("retries", function()
    it("follow a policy bounded by about 30 s of waiting, not by a small count", function()
      local total, delays = 0, {}
      local n = 0
      while true do
        local d = core.retry_delay(n + 1)
        if d < 0 then break end
        n = n + 1
        assert.is_true(d > 0 and d <= 0.375, "delay " .. d .. " of attempt " .. n)
        total = total + d
        delays[n] = d
      end
      assert.is_true(n >= 100, "attempts allowed: " .. n)
      assert.is_true(total >= 15 and total <= 46, "total wait " .. total)
      assert.equal(-1, core.retry_delay(0))
      -- jittered: capped delays are not all the same
      local same = true
      for i = n - 9, n do same = same and delays[i] == delays[n] end
      assert.is_false(same)
    end)

    it("survive many consecutive serialization failures (more than the old 12)", function()
      local m = machine()
      admin:exec("INSERT INTO counters VALUES ($1, 0)", m)
      local attempts = 0
      bmdb.transact(function(tx)
        attempts = attempts + 1
        local n = tx:one("SELECT n FROM counters WHERE machine_id = $1", m).n
        if attempts <= 20 then
          -- another client commits a write to the row we read: our write fails with 40001
          admin:exec("UPDATE counters SET n = n + 100 WHERE machine_id = $1", m)
        end
        tx:exec("UPDATE counters SET n = $2 WHERE machine_id = $1", m, n + 1)
      end)
      assert.equal(21, attempts)
      assert.equal(2001, admin:one("SELECT n FROM counters WHERE machine_id = $1", m).n)
    end)

    it("retry a lost connection on a fresh one", function()
      local m = machine()
      local attempts = 0
      bmdb.transact(function(tx)
        attempts = attempts + 1
        if attempts == 1 then
          pcall(tx.exec, tx, "SELECT pg_terminate_backend(pg_backend_pid())")
        end
        tx:exec("INSERT INTO counters VALUES ($1, $2)", m, attempts)
      end)
      assert.equal(2, attempts)
      assert.equal(2, admin:one("SELECT n FROM counters WHERE machine_id = $1", m).n)
    end)

    it("raise a connection lost during COMMIT unchanged (outcome unknown), without running fn again", function()
      -- A deferred trigger kills the backend while it commits.
      admin:exec([[CREATE TABLE doomed (x INT8)]])
      admin:exec([[CREATE FUNCTION doomed_kill() RETURNS trigger LANGUAGE plpgsql AS $$
                   BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NULL; END $$]])
      admin:exec([[CREATE CONSTRAINT TRIGGER doomed_at_commit AFTER INSERT ON doomed
                   DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION doomed_kill()]])
      local attempts = 0
      local err = failure(bmdb.transact, function(tx)
        attempts = attempts + 1
        tx:exec("INSERT INTO doomed VALUES (1)")
      end)
      assert.equal(1, attempts)
      assert.truthy(bmdb.is_error(err, "connection"), tostring(err))
      assert.equal("unknown", err.outcome)
    end)
  end)

  describe("refuses NaN and infinity", function()
    local function problems(field, value)
      local def = { process = "P", select = function() end, run = function() end }
      def[field] = value
      return table.concat(require("bmdb.internal").problems(def), "; ")
    end

    for _, case in ipairs {
      { "poll", NAN, "poll must be a number of seconds above 0, got nan" },
      { "poll", INF, "poll must be a number of seconds above 0, got inf" },
      { "batch", NAN, "batch must be a whole number" },
      { "batch", INF, "batch must be a whole number" },
      { "batch", 2.5, "batch must be a whole number" },
      { "concurrency", NAN, "concurrency must be a whole number" },
      { "concurrency", INF, "concurrency must be a whole number" },
      { "ahead", NAN, "ahead must be a whole number of items from 0 to 32, got nan" },
      { "ahead", -1, "ahead must be a whole number of items from 0 to 32, got -1" },
      { "ahead", 2.5, "ahead must be a whole number of items from 0 to 32, got 2.5" },
      { "ahead", 33, "ahead must be a whole number of items from 0 to 32, got 33" },
      { "backoff", NAN, "backoff must be a finite number" },
      { "backoff", { initial = NAN }, "backoff.initial must be a finite number" },
      { "backoff", { maximum = INF }, "backoff.maximum must be a finite number" },
      { "backoff", { exponent = -INF }, "backoff.exponent must be a finite number" },
    } do
      it("in a worker's " .. case[1] .. " = " .. show(case[2]), function()
        assert.matches("worker P: " .. case[3], problems(case[1], case[2]), 1, true)
      end)
    end

    for _, case in ipairs {
      { { initial = NAN }, nil, "backoff.initial must be a finite number, got nan" },
      { { initial = 1, maximum = INF, exponent = 2 }, 1, "backoff.maximum must be a finite number, got inf" },
      { { initial = 1, exponent = NAN }, 1, "backoff.exponent must be a finite number" },
      { INF, nil, "backoff must be a finite number of seconds, got inf" },
      { { initial = 1 }, NAN, "the last period must be a finite number" },
    } do
      it("in bmdb.backoff_next(" .. show(case[1]) .. ", " .. show(case[2]) .. ")", function()
        local err = failure(bmdb.backoff_next, case[1], case[2])
        assert.matches(case[3], tostring(err):gsub("%-nan", "nan"), 1, true)
      end)
    end

    it("in bmdb.sleep", function()
      for _, v in ipairs { NAN, INF } do
        assert.matches("bad argument #1 to 'sleep' (expected a finite number of seconds >= 0", tostring(failure(bmdb.sleep, v)), 1, true)
      end
    end)

    it("in w:fail's backoff, before anything is recorded with it", function()
      local m = machine()
      local err = failure(bmdb.work, m, "NanFail", function(w) w:fail("broken", { initial = NAN }) end,
                          { backoff = { initial = 3 } })
      assert.matches("bad argument #2 to 'fail' (backoff.initial must be a finite number", tostring(err), 1, true)
      -- the body's raise failed the item with the worker's own backoff
      local b = admin:one("SELECT last_seconds FROM work_backoff WHERE machine_id = $1 AND process = 'NanFail'", m)
      assert.equal(3, b.last_seconds)
    end)
  end)

  describe("work items", function()
    it("keep machine, process, session_id and attempt: a body cannot change them", function()
      local m, other = machine(), machine()
      for _, field in ipairs { "machine", "process", "session_id", "attempt" } do
        local err = failure(bmdb.work, m, "ReadOnly", function(w)
          w.note = "bodies may keep their own fields"
          assert.equal("bodies may keep their own fields", w.note)
          w[field] = field == "attempt" and 7 or other
        end)
        assert.matches("w." .. field .. " is read-only", tostring(err), 1, true)
        -- the item was failed on its own machine, not reported as a lost session
        local e = last_event(m, "ReadOnly")
        assert.equal("Failed", e.event)
        assert.matches("w." .. field .. " is read-only", e.cause, 1, true)
        assert.equal(0, admin:one("SELECT count(*) AS n FROM work WHERE machine_id = $1", m).n)
        admin:exec("DELETE FROM work_backoff WHERE machine_id = $1", m)
      end
      assert.equal(0, admin:one("SELECT count(*) AS n FROM work_history WHERE machine_id = $1", other).n)
    end)

    for _, case in ipairs {
      { "a table with a message", { message = "disk full", code = 28 }, "^disk full" },
      { "a table without one", { code = 42, why = "no" }, '^%(error object is a table: {code=42, why="no"}%)' },
      { "a table with __tostring", setmetatable({}, { __tostring = function() return "custom text" end }), "^custom text" },
      { "a number", 42, "^[^\n]*42\n" },
      { "nil", nil, "^%(error object is a nil value%)" },
      { "a boolean", false, "^%(error object is a boolean value: false%)" },
    } do
      it("record a readable cause when the body raises " .. case[1], function()
        local m = machine()
        pcall(bmdb.work, m, "Raises", function() error(case[2]) end)
        local e = last_event(m, "Raises")
        assert.equal("Failed", e.event)
        assert.matches(case[3], e.cause)
        assert.is_nil(e.cause:find("table: 0x", 1, true), e.cause)
      end)
    end
  end)

  describe("hosts", function()
    local dir

    local function host(args, env)
      local argv = { H.bin, "--interval", "2", "--component", "policy_spec" }
      for _, a in ipairs(args) do argv[#argv + 1] = a end
      local e = { BMDB_DSN = dsn }
      for k, v in pairs(env or {}) do e[k] = v end
      return H.spawn { argv = argv, env = e }
    end

    setup(function() dir = H.tmpdir("policy") end)

    it("skip a candidate that names no machine, or is no machine id, with a warning, and claim the next", function()
      admin:exec("CREATE TABLE skip_wanted (machine_id UUID PRIMARY KEY)")
      local real = machine()
      local ghost = admin:one("SELECT gen_random_uuid()::TEXT AS u").u
      admin:exec("INSERT INTO skip_wanted VALUES ($1), ($2)", real, ghost)
      H.write_file(dir .. "/skip.lua", [[
        local bmdb = require "bmdb"
        return {
          bmdb.worker {
            process = "Skip", poll = 0.2,
            select = function(tx, limit)
              local rows = tx:query("SELECT machine_id FROM skip_wanted LIMIT $1", limit)
              rows[#rows + 1] = { machine_id = "not-a-uuid" }
              return rows
            end,
            run = function(w)
              w:finish(function(tx) tx:exec("DELETE FROM skip_wanted WHERE machine_id = $1", w.machine) end)
            end,
          },
        }
      ]])
      local p = host { dir .. "/skip.lua" }
      H.wait_until(function()
        local e = last_event(real, "Skip")
        return e and e.event == "Finished"
      end, 30, "the real machine to be finished")
      -- the bad candidates stay: a few more claims run past them
      p:await("stderr", "reason=\"no such machine (machines has no row with this id)\"")
      p:await("stderr", "candidate=not-a-uuid")
      p:kill("TERM")
      assert.equal(0, p:wait(30), p:stderr())
      local log = p:stderr()
      assert.matches("msg=\"claim skipped a candidate\" process=Skip candidate=" .. ghost, log, 1, true)
      assert.is_nil(log:find("claim failed", 1, true), log)
    end)

    it("log a warning naming the machine and the first decision when a body decides twice", function()
      local m = machine()
      H.write_file(dir .. "/twice.lua", [[
        local bmdb = require "bmdb"
        bmdb.work(arg[1], "Twice", function(w)
          w:finish()
          print("second finish raised: " .. tostring(not pcall(w.finish, w)))
        end)
      ]])
      local p = host { dir .. "/twice.lua", m }
      assert.equal(0, p:wait(30), p:stderr())
      assert.matches("second finish raised: true", p:stdout(), 1, true)
      local line = p:stderr():match("[^\n]*work decided twice[^\n]*")
      assert.truthy(line, p:stderr())
      assert.matches("level=warn", line, 1, true)
      assert.matches("machine=" .. m, line, 1, true)
      assert.matches("decision=finished refused=finish", line, 1, true)
      assert.equal("Finished", last_event(m, "Twice").event)
    end)

    it("say that an option needs a value when it is the last argument", function()
      for _, flag in ipairs { "--interval", "--dsn", "--grace" } do
        local code, _, err = H.run({ H.bin, flag })
        assert.equal(2, code)
        assert.matches("option " .. flag .. " needs a value", err, 1, true)
        assert.is_nil(err:find("unknown option", 1, true), err)
      end
    end)
  end)
end)
