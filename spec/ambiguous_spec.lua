-- A COMMIT the server answers with "result is ambiguous" (SQLSTATE 40003,
-- what CockroachDB says when it cannot tell whether a commit landed) is a
-- COMMIT with an unknown outcome, as one whose answer the connection lost.
-- PostgreSQL never says it by itself: a deferred constraint trigger raises
-- it at COMMIT, so the COMMIT itself answers 40003 (and, on PostgreSQL,
-- rolls back). A sequence, outside every transaction, counts the COMMITs
-- it failed.
local H = require "support.helpers"
local bmdb = require "bmdb"

describe("an ambiguous COMMIT (40003)", function()
  local dsn, admin, dir

  setup(function()
    dsn, admin = H.open_core("ambiguous_spec")
    dir = H.tmpdir("ambiguous")
    admin:exec("CREATE SEQUENCE ambiguous_fired")
    admin:exec("CREATE TABLE ambiguous_budget (n INT8 NOT NULL)")
    admin:exec("INSERT INTO ambiguous_budget VALUES (0)")
    -- Fails COMMIT with 40003 while fewer than ambiguous_budget.n have failed.
    admin:exec([[CREATE FUNCTION ambiguous_commit() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                   IF nextval('ambiguous_fired') <= (SELECT n FROM ambiguous_budget) THEN
                     RAISE EXCEPTION 'result is ambiguous (spec)' USING ERRCODE = '40003';
                   END IF;
                   RETURN NULL;
                 END $$]])
    admin:exec("CREATE TABLE effects (machine_id UUID, attempt INT8, what TEXT)")
    admin:exec([[CREATE CONSTRAINT TRIGGER effects_at_commit AFTER INSERT ON effects
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ambiguous_commit()]])
    admin:exec("CREATE TABLE wanted (machine_id UUID NOT NULL)")
  end)

  teardown(function() H.close_core(admin) end)

  -- The next n COMMITs that carry an effect answer 40003.
  local function fail_next(n)
    admin:exec("SELECT setval('ambiguous_fired', 1, false)")
    admin:exec("UPDATE ambiguous_budget SET n = $1", n)
  end

  it("makes bmdb.transact raise a connection error with outcome unknown, without running fn again", function()
    fail_next(1)
    local attempts = 0
    local err = H.failure(bmdb.transact, function(tx)
      attempts = attempts + 1
      tx:exec("INSERT INTO effects VALUES (gen_random_uuid(), $1, 'transact')", attempts)
    end)
    assert.equal(1, attempts)
    assert.truthy(bmdb.is_error(err, "connection"), tostring(err))
    assert.equal("unknown", err.outcome)
    assert.equal("40003", err.sqlstate)
    assert.matches("result is ambiguous (spec)", err.message, 1, true)
    assert.matches("outcome unknown", err.message, 1, true)
  end)

  -- A finish joins the host's batch; its COMMIT answers 40003, so the
  -- finish is tried alone, and that COMMIT answers 40003 too. As after a
  -- lost answer, the finish is tried again (not raised to the body as a
  -- server error, which would fail the item), and the third COMMIT lands.
  it("has a finish whose COMMIT answers 40003 tried again as one whose answer was lost", function()
    local m = admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
    admin:exec("INSERT INTO wanted VALUES ($1)", m)
    fail_next(2)
    H.write_file(dir .. "/worker.lua", [[
      local bmdb = require "bmdb"
      return { bmdb.worker {
        process = "Ambiguous", poll = 0.2,
        select = function(tx, limit)
          return tx:query([=[SELECT w.machine_id FROM wanted w WHERE NOT EXISTS
            (SELECT 1 FROM effects e WHERE e.machine_id = w.machine_id) AND NOT EXISTS
            (SELECT 1 FROM work_blocked b WHERE b.machine_id = w.machine_id AND b.process = 'Ambiguous')
            LIMIT $1]=], limit)
        end,
        run = function(w)
          w:finish(function(tx)
            tx:exec("INSERT INTO effects VALUES ($1, $2, 'finish')", w.machine, w.attempt)
          end)
        end,
      } }
    ]])
    local h = H.spawn { argv = { H.bin, "--interval", "2", dir .. "/worker.lua" }, env = { BMDB_DSN = dsn } }
    H.wait_until(function()
      return admin:one("SELECT count(*) AS n FROM work_history WHERE machine_id = $1 AND event IN ('Finished', 'Failed')", m).n > 0
    end, 30, function() return "the item's end\n" .. h:stderr() end)
    local events = {}
    for _, r in ipairs(admin:query("SELECT event FROM work_history WHERE machine_id = $1 ORDER BY occurred_at, history_id", m)) do
      events[#events + 1] = r.event
    end
    assert.same({ "Started", "Finished" }, events, h:stderr())
    assert.equal(3, admin:one("SELECT last_value AS n FROM ambiguous_fired").n)
    assert.equal(1, admin:one("SELECT count(*) AS n FROM effects WHERE machine_id = $1", m).n)
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
  end)
end)
