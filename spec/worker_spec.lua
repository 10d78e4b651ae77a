-- Worker scripts: several hosts, several slots, one database.
local H = require "support.helpers"
local http = require "support.http"
local core = require "bmdb.core"

describe("workers", function()
  local dsn, admin, dir

  local function count(sql, ...)
    return admin:one("SELECT count(*) AS n FROM (" .. sql .. ") q", ...).n
  end

  local function start_host(script, args, extra_env)
    local argv = { H.bin, "--interval", "2", "--component", "worker_spec" }
    for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
    argv[#argv + 1] = script
    local env = { BMDB_DSN = dsn }
    for k, v in pairs(extra_env or {}) do env[k] = v end
    return H.spawn { argv = argv, env = env }
  end

  local function machines(n)
    local ids = {}
    for i = 1, n do ids[i] = admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id end
    return ids
  end

  local function events(m) return H.events(admin, m) end

  -- A worker script's select: the wanted machines that process has not
  -- finished and nothing blocks.
  local function wanted_select(process)
    return ([[
          select = function(tx, limit)
            return tx:query([=[SELECT w.machine_id FROM wanted w
              WHERE NOT EXISTS (SELECT 1 FROM work_history h WHERE h.machine_id = w.machine_id
                                AND h.process = '%s' AND h.event = 'Finished')
              AND NOT EXISTS (SELECT 1 FROM work_blocked b WHERE b.machine_id = w.machine_id AND b.process = '%s')
              LIMIT $1]=], limit)
          end,
]]):format(process, process)
  end

  setup(function()
    dsn = H.postgres():create_db()
    assert.equal(0, (H.run({ H.bin, "migrate" }, { env = { BMDB_DSN = dsn } })))
    admin = core.connect(dsn)
    dir = H.tmpdir("worker")
    admin:exec([[CREATE TABLE passes (machine_id UUID PRIMARY KEY REFERENCES machines, n INT8 NOT NULL DEFAULT 0)]])
    admin:exec("CREATE TABLE wanted (machine_id UUID PRIMARY KEY REFERENCES machines)")
    -- machines a spec's script works on, and whether it did
    admin:exec("CREATE TABLE combo (machine_id UUID PRIMARY KEY REFERENCES machines, done BOOLEAN NOT NULL DEFAULT false)")
    admin:exec("CREATE TABLE yielded (machine_id UUID PRIMARY KEY REFERENCES machines, done BOOLEAN NOT NULL DEFAULT false)")
    admin:exec([[CREATE TABLE intervals (machine_id UUID NOT NULL, host TEXT NOT NULL,
                 started_at TIMESTAMPTZ NOT NULL, ended_at TIMESTAMPTZ NOT NULL)]])
  end)

  teardown(function() admin:close() end)

  -- each test wants only its own machines
  before_each(function() admin:exec("DELETE FROM wanted") end)

  it("never overlaps two holders of a machine and processes each eligible machine once per pass", function()
    H.write_file(dir .. "/passes.lua", [[
      local bmdb = require "bmdb"
      return {
        bmdb.worker {
          process = "Pass", concurrency = 3, poll = 0.2,
          select = function(tx, limit)
            return tx:query([=[SELECT p.machine_id FROM passes p
              WHERE p.n < 3 AND NOT EXISTS (SELECT 1 FROM work_blocked b
                WHERE b.machine_id = p.machine_id AND b.process = 'Pass') LIMIT $1]=], limit)
          end,
          run = function(w)
            local started = bmdb.transact(function(tx) return tx:one("SELECT clock_timestamp()::TEXT AS t").t end)
            bmdb.sleep(math.random() * 0.05)
            w:finish(function(tx)
              tx:exec("INSERT INTO intervals VALUES ($1, $2, $3, clock_timestamp())", w.machine, arg[0] .. os.getenv("HOSTNO"), started)
              tx:exec("UPDATE passes SET n = n + 1 WHERE machine_id = $1", w.machine)
            end)
          end,
        },
      }
    ]])
    local ids = machines(20)
    for _, m in ipairs(ids) do admin:exec("INSERT INTO passes (machine_id) VALUES ($1)", m) end
    local hosts = {}
    for i = 1, 3 do hosts[i] = start_host(dir .. "/passes.lua", {}, { HOSTNO = tostring(i) }) end
    H.wait_until(function() return count("SELECT 1 FROM passes WHERE n < 3") == 0 end, 120, "three passes over every machine")
    for _, h in ipairs(hosts) do h:kill("TERM") end
    for _, h in ipairs(hosts) do assert.equal(0, h:wait(30), h:stderr()) end
    for _, m in ipairs(ids) do
      local rows = admin:query("SELECT started_at, ended_at FROM intervals WHERE machine_id = $1 ORDER BY started_at", m)
      assert.equal(3, #rows, "machine " .. m .. " processed exactly three times")
      for i = 2, #rows do
        assert.is_true(admin:one("SELECT $1::TIMESTAMPTZ >= $2::TIMESTAMPTZ AS ok", rows[i].started_at, rows[i - 1].ended_at).ok,
          "intervals of " .. m .. " overlap")
      end
    end
    -- the work spread over the hosts rather than one taking everything
    assert.is_true(count("SELECT DISTINCT host FROM intervals") >= 2)
    assert.equal(0, count("SELECT 1 FROM work"))
  end)

  -- Claims and finishes of one host take turns, and a claim claims for the
  -- slots that wait (host/sched.h): before, a claim that overlapped a
  -- finish or another claim was rolled back as a serialization "pivot"
  -- about once in four at 16 slots, and retried after a sleep.
  it("claims for waiting slots in one transaction, and one host's claims never conflict", function()
    admin:exec("CREATE TABLE todo (machine_id UUID PRIMARY KEY REFERENCES machines)")
    H.write_file(dir .. "/todo.lua", [[
      local bmdb = require "bmdb"
      return { bmdb.worker { process = "Todo", concurrency = 8, poll = 0.2,
        select = function(tx, limit)
          return tx:query([=[SELECT t.machine_id FROM todo t WHERE NOT EXISTS (SELECT 1 FROM work_blocked b
            WHERE b.machine_id = t.machine_id AND b.process = 'Todo') LIMIT $1]=], limit)
        end,
        run = function(w)
          w:finish(function(tx) tx:exec("DELETE FROM todo WHERE machine_id = $1", w.machine) end)
        end } }
    ]])
    admin:exec("INSERT INTO todo SELECT machine_id FROM unnest($1::UUID[]) AS m (machine_id)",
               "{" .. table.concat(machines(300), ",") .. "}")
    local h = start_host(dir .. "/todo.lua")
    H.wait_until(function() return count("SELECT 1 FROM todo") == 0 end, 120, "the 300 items")
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
    local started = admin:one([[SELECT count(*) AS items, count(DISTINCT xmin::TEXT) AS claims
                                FROM work_history WHERE process = 'Todo' AND event = 'Started']])
    assert.equal(300, started.items)
    -- each claim's Started rows share its transaction's id
    assert.is_true(started.claims < started.items, started.claims .. " claims for 300 items")
    assert.matches('msg="workers stopped" claims=300 retries=0', h:stderr())
  end)

  -- At one slot a finish is a batch of one whose member is the host's
  -- only finish, so it also claims the next item in its transaction
  -- (claim_in_batch). Here the session
  -- is lost between the two: the select, which runs after the release,
  -- stops the heartbeat and waits out the session. Neither the finish nor
  -- the claim may commit; both machines are then worked under the next
  -- session.
  it("commits neither the finish nor the claim of a combined transaction when the session is lost between them", function()
    local a, b = unpack(machines(2))
    H.write_file(dir .. "/combo.lua", string.format([[
      local bmdb = require "bmdb"
      local core = require "bmdb.core"
      local STALL, GO, A = %q, %q, %q
      return { bmdb.worker { process = "Combo", concurrency = 1, poll = 0.1,
        select = function(tx, limit)
          -- In A's finish (its commit function ran in this transaction):
          -- lose the session before the claim goes out.
          local f = io.open(STALL)
          if f and tx:one("SELECT done FROM combo WHERE machine_id = $1", A).done then
            f:close()
            os.remove(STALL)
            local s = core.session()
            core.pause_heartbeat(true)
            core.sleep(60, s) -- returns once the session is lost
            core.pause_heartbeat(false)
          elseif f then
            f:close()
          end
          return tx:query("SELECT machine_id FROM combo WHERE NOT done LIMIT $1", limit)
        end,
        run = function(w)
          while not io.open(GO) do bmdb.sleep(0.02) end -- B is there to be claimed
          w:finish(function(tx) tx:exec("UPDATE combo SET done = true WHERE machine_id = $1", w.machine) end)
        end } }
    ]], dir .. "/stall", dir .. "/go", a))
    H.write_file(dir .. "/stall", "")
    admin:exec("INSERT INTO combo (machine_id) VALUES ($1)", a)
    local h = start_host(dir .. "/combo.lua", { "--log-level", "debug" })
    H.wait_until(function() return admin:one("SELECT count(*) AS n FROM work WHERE machine_id = $1", a).n == 1 end,
      30, "A to be claimed")
    admin:exec("INSERT INTO combo (machine_id) VALUES ($1)", b)
    H.write_file(dir .. "/go", "")
    H.wait_until(function() return count("SELECT 1 FROM combo WHERE done") == 2 end, 60, "both machines, under a new session")
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
    assert.is_nil(io.open(dir .. "/stall"), "the select never lost the session")
    local first = admin:one([[SELECT session_id FROM work_history WHERE machine_id = $1 AND event = 'Started'
                              ORDER BY occurred_at, history_id LIMIT 1]], a).session_id
    -- Under the first session A started, and was abandoned when the
    -- session was collected: no Finished for A, nothing for B.
    local under_first = {}
    for _, r in ipairs(admin:query([[SELECT machine_id, event FROM work_history WHERE session_id = $1
                                     ORDER BY occurred_at, history_id]], first)) do
      under_first[#under_first + 1] = (r.machine_id == a and "A " or "B ") .. r.event
    end
    assert.is_true(under_first[1] == "A Started" and (#under_first == 1 or
      (#under_first == 2 and under_first[2] == "A Abandoned")), table.concat(under_first, ", "))
    assert.equal(1, count("SELECT 1 FROM work_history WHERE machine_id = $1 AND event = 'Finished'", a))
    assert.equal(1, count("SELECT 1 FROM work_history WHERE machine_id = $1 AND event = 'Finished'", b))
  end)

  -- What every batch spec's script shares: its worker's select over the
  -- batch table, and four_started, true once four items (or eight: a
  -- batch claims its next four at once) have started.
  local batch_script_head = H.script_wait_for .. [[
      local function batch_select(tx, limit)
        return tx:query([=[SELECT b.machine_id FROM batch b WHERE NOT b.done AND NOT EXISTS (SELECT 1
          FROM work_blocked k WHERE k.machine_id = b.machine_id AND k.process = 'Batch') LIMIT $1]=], limit)
      end
      local function four_started()
        return bmdb.transact(function(tx)
          local n = tx:one([=[SELECT count(*) AS n FROM work_history WHERE event = 'Started'
                              AND machine_id IN (SELECT machine_id FROM batch)]=]).n
          return n > 0 and n % 4 == 0
        end)
      end
]]

  -- Four slots finish at once and share one transaction (host/sched.h),
  -- one savepoint each. The script's bodies wait until four items (or
  -- eight) have started, and the first commit function until all four
  -- have joined the batch, so the batch is whole rather than however the
  -- timing fell.
  -- BAD (a machine id, or "") names the item whose commit function fails
  -- by raising after its write, BAD_SQL one whose commit function's second
  -- statement fails (the server then only accepts a rollback); FAIL_ONCE
  -- names one whose first commit function fails with a serialization
  -- failure (40001). With DEFER=1 the commit functions defer their
  -- statements (tx:defer), so no member sends anything; BAD's
  -- then runs a statement first (its savepoint goes out), and BAD_DEFERRED
  -- names one that defers its write and raises without sending anything.
  -- LAST_EXEC names one that sends a statement once the others have left.
  local function batch_script(name)
    H.write_file(dir .. "/" .. name .. ".lua", [[
      local bmdb = require "bmdb"
      local core = require "bmdb.core"
      local BAD, BAD_SQL, FAIL_ONCE = os.getenv("BAD"), os.getenv("BAD_SQL"), os.getenv("FAIL_ONCE")
      local DEFER, BAD_DEFERRED = os.getenv("DEFER") == "1", os.getenv("BAD_DEFERRED")
      local LAST_EXEC = os.getenv("LAST_EXEC")
      local failed_once, joined = false, false
]] .. batch_script_head .. [[
      return { bmdb.worker { process = "Batch", concurrency = 4, poll = 0.1, backoff = { initial = 3600 },
        select = batch_select,
        run = function(w)
          wait_for("four items started", four_started)
          w:finish(function(tx)
            -- (once; and a member that finishes alone after the batch
            -- failed is in none: then there are none)
            if not joined then
              joined = true
              wait_for("four members in the batch", function()
                local n = core.batch_members()
                return n == 4 or n == 0
              end)
            end
            if w.machine == LAST_EXEC then
              -- the other members have left: what they deferred flies with this
              wait_for("the other members to leave", function()
                local n, active = core.batch_members()
                return n == 0 or active == 1
              end)
              tx:exec("SELECT 1")
            end
            local send = DEFER and tx.defer or tx.exec
            if DEFER and w.machine == BAD then tx:exec("SELECT 1") end
            send(tx, "UPDATE batch SET done = true, runs = runs + 1 WHERE machine_id = $1", w.machine)
            if w.machine == BAD or w.machine == BAD_DEFERRED then
              -- deferred and then dropped, it never runs: run, it would fail the batch
              if DEFER then tx:defer("SELECT 1 / (runs - runs) FROM batch WHERE machine_id = $1", w.machine) end
              error("the commit function of this item fails")
            end
            if w.machine == BAD_SQL then send(tx, "SELECT 1 / (runs - runs) FROM batch WHERE machine_id = $1", w.machine) end
            if w.machine == FAIL_ONCE and not failed_once then
              failed_once = true
              tx:exec("DO $d$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $d$")
            end
          end)
        end } }
    ]])
    return dir .. "/" .. name .. ".lua"
  end

  -- The batch table, holding n new machines (their ids), none done.
  local function fill_batch(n)
    admin:exec("CREATE TABLE IF NOT EXISTS batch (machine_id UUID PRIMARY KEY REFERENCES machines, " ..
               "done BOOLEAN NOT NULL DEFAULT false, runs INT8 NOT NULL DEFAULT 0)")
    admin:exec("DELETE FROM batch")
    local ids = machines(n)
    for _, m in ipairs(ids) do admin:exec("INSERT INTO batch (machine_id) VALUES ($1)", m) end
    return ids
  end

  local function run_batch(script, env, n)
    n = n or 4
    local ids = fill_batch(n)
    local h = start_host(script, {}, env(ids))
    H.wait_until(function()
      return count([[SELECT 1 FROM work_history WHERE event IN ('Finished', 'Failed')
                     AND machine_id IN (SELECT machine_id FROM batch)]]) == n
    end, 60, n .. " decisions")
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
    return ids, h
  end

  -- n items Finished, their releases committed in one transaction: one xmin.
  local function assert_finished_together(n)
    local finished = admin:one([[SELECT count(*) AS n, count(DISTINCT xmin::TEXT) AS xids FROM work_history
                                 WHERE event = 'Finished' AND machine_id IN (SELECT machine_id FROM batch)]])
    assert.same({ n = n, xids = 1 }, { n = finished.n, xids = finished.xids })
  end

  it("finishes the others of a batch whose commit functions fail, undoing only those", function()
    local ids = run_batch(batch_script("batch_bad"), function(ids)
      return { BAD = ids[2], BAD_SQL = ids[4], FAIL_ONCE = "" }
    end)
    for bad, cause in pairs({ [ids[2]] = "the commit function of this item fails", [ids[4]] = "division by zero" }) do
      assert.same({ "Started", "Failed" }, events(bad))
      assert.matches(cause, admin:one("SELECT cause FROM work_history WHERE machine_id = $1 AND event = 'Failed'", bad).cause)
      -- its savepoint was rolled back: its write is gone, the others' stay
      assert.is_false(admin:one("SELECT done FROM batch WHERE machine_id = $1", bad).done)
    end
    assert.equal(2, count("SELECT 1 FROM batch WHERE done"))
    assert_finished_together(2)
    assert.equal(0, count("SELECT 1 FROM work WHERE process = 'Batch'"))
  end)

  -- Eight items ran once each, and one transaction both finished four and
  -- claimed the next four: their Started and Finished rows share its xmin.
  local function assert_finished_and_claimed_together()
    local shared = admin:query([[SELECT xmin::TEXT AS xid, count(*) FILTER (WHERE event = 'Started') AS started,
                                   count(*) FILTER (WHERE event = 'Finished') AS finished
                                 FROM work_history WHERE machine_id IN (SELECT machine_id FROM batch)
                                 GROUP BY xmin HAVING count(*) FILTER (WHERE event = 'Started') > 0
                                   AND count(*) FILTER (WHERE event = 'Finished') > 0]])
    assert.equal(1, #shared, "no transaction both finished and claimed")
    assert.same({ 4, 4 }, { shared[1].started, shared[1].finished })
    assert.equal(8, count("SELECT 1 FROM batch WHERE done AND runs = 1"))
  end

  -- The slot that closes a batch claims the next items in the batch's
  -- transaction, for itself and for the members of its worker: four
  -- items finish together, and the Started rows of the next four share
  -- the transaction id of their Finished rows.
  it("claims the next items in the transaction of a batch of finishes", function()
    run_batch(batch_script("batch_claim"), function() return { BAD = "", BAD_SQL = "", FAIL_ONCE = "" } end, 8)
    assert_finished_and_claimed_together()
  end)

  -- Commit functions that only defer send nothing of their own: their
  -- statements ride with the batch's select (it claims the next four),
  -- so the four items still end and the next four start in one
  -- transaction.
  it("finishes and claims in one transaction when the members' commit functions only defer", function()
    run_batch(batch_script("batch_defer"), function()
      return { BAD = "", BAD_SQL = "", FAIL_ONCE = "", DEFER = "1" }
    end, 8)
    assert_finished_and_claimed_together()
  end)

  -- A member's commit function runs as soon as its slot joins the batch:
  -- only a statement it sends waits to use the batch's transaction. The
  -- gate's member joins first and its statement waits on a row the spec
  -- holds locked; the other three join behind it, and their commit
  -- functions, which only defer, run meanwhile (members that took turns
  -- would wait behind the gate's). Released, all four commit together.
  it("runs the commit functions of a batch's members while another member's statement waits", function()
    H.write_file(dir .. "/batch_gate.lua", [[
      local bmdb = require "bmdb"
      local GATE, DIR = os.getenv("GATE"), os.getenv("DIR")
]] .. batch_script_head .. [[
      local function exists(p) local f = io.open(p) if f then f:close() end return f ~= nil end
      local function touch(p) assert(io.open(p, "w")):close() end
      return { bmdb.worker { process = "Batch", concurrency = 4, poll = 0.1,
        select = batch_select,
        run = function(w)
          wait_for("four items started", four_started)
          if w.machine ~= GATE then
            wait_for("the gate's member", function() return exists(DIR .. "/gate-in") end)
          end
          w:finish(function(tx)
            if w.machine == GATE then
              touch(DIR .. "/gate-in")
              tx:exec("SELECT 1 FROM batch_gate FOR UPDATE")
            else
              touch(DIR .. "/ran-" .. w.machine)
            end
            tx:defer("UPDATE batch SET done = true, runs = runs + 1 WHERE machine_id = $1", w.machine)
          end)
        end } }
    ]])
    admin:exec("CREATE TABLE batch_gate (x INT8)")
    admin:exec("INSERT INTO batch_gate VALUES (1)")
    local gate_dir = H.tmpdir("gate")
    local locker = core.connect(dsn)
    locker:exec("BEGIN")
    locker:exec("SELECT 1 FROM batch_gate FOR UPDATE")
    local ids = fill_batch(4)
    local h = start_host(dir .. "/batch_gate.lua", {}, { GATE = ids[1], DIR = gate_dir })
    local function ran(m) local f = io.open(gate_dir .. "/ran-" .. m) if f then f:close() end return f ~= nil end
    H.wait_until(function() return ran(ids[2]) and ran(ids[3]) and ran(ids[4]) end, 30,
                 "the other members' commit functions")
    -- the gate's statement still waits: nothing has committed
    assert.equal(1, count([[SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'
                            AND query LIKE '%batch_gate FOR UPDATE%']]))
    assert.equal(0, count("SELECT 1 FROM work_history WHERE event = 'Finished' AND machine_id IN (SELECT machine_id FROM batch)"))
    locker:exec("COMMIT")
    locker:close()
    H.wait_until(function()
      return count([[SELECT 1 FROM work_history WHERE event = 'Finished'
                     AND machine_id IN (SELECT machine_id FROM batch)]]) == 4
    end, 30, "four finishes")
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
    assert_finished_together(4)
    assert.equal(4, count("SELECT 1 FROM batch WHERE done AND runs = 1"))
  end)

  -- A commit function that raises after deferring its write and a
  -- statement that would fail: what it deferred is dropped with its
  -- savepoint (sent or not), so the others' writes commit in the batch.
  it("drops the deferred statements of a batch member whose commit function raises", function()
    local ids = run_batch(batch_script("batch_defer_raise"), function(ids)
      return { BAD = ids[2], BAD_DEFERRED = ids[4], BAD_SQL = "", FAIL_ONCE = "", DEFER = "1" }
    end)
    for _, bad in ipairs({ ids[2], ids[4] }) do
      assert.same({ "Started", "Failed" }, events(bad))
      assert.is_false(admin:one("SELECT done FROM batch WHERE machine_id = $1", bad).done)
    end
    assert.equal(2, count("SELECT 1 FROM batch WHERE done AND runs = 1"))
    assert_finished_together(2)
  end)

  -- A deferred statement that fails does so in the batch's flight, after
  -- its member has left: the batch commits nothing, every member finishes
  -- alone, and the failing one's own transaction then raises it.
  it("finishes the others of a batch whose deferred statement fails, and fails only its item", function()
    local ids = run_batch(batch_script("batch_defer_bad"), function(ids)
      return { BAD = "", BAD_SQL = ids[3], FAIL_ONCE = "", DEFER = "1" }
    end)
    assert.same({ "Started", "Failed" }, events(ids[3]))
    local cause = admin:one("SELECT cause FROM work_history WHERE machine_id = $1 AND event = 'Failed'", ids[3]).cause
    assert.matches("division by zero", cause, 1, true)
    assert.matches("deferred with tx:defer", cause, 1, true)
    assert.is_false(admin:one("SELECT done FROM batch WHERE machine_id = $1", ids[3]).done)
    for _, m in ipairs({ ids[1], ids[2], ids[4] }) do assert.same({ "Started", "Finished" }, events(m)) end
    -- nothing of the failed batch committed: each other write landed once,
    -- in a transaction of its own
    assert.equal(3, count("SELECT 1 FROM batch WHERE done AND runs = 1"))
    assert.equal(3, count([[SELECT DISTINCT xmin::TEXT FROM work_history
                            WHERE event = 'Finished' AND machine_id IN (SELECT machine_id FROM batch)]]))
    assert.equal(0, count("SELECT 1 FROM work WHERE process = 'Batch'"))
  end)

  -- A member's statement flies with what the members that left before it
  -- deferred. When one of those fails, the statement reports it, but the
  -- failure is not that member's: the batch fails, every member finishes
  -- alone, and only the item whose commit function deferred it is Failed.
  it("fails only the deferring item when a member's statement meets another's failing deferred one", function()
    local ids = run_batch(batch_script("batch_defer_meets"), function(ids)
      return { BAD = "", BAD_SQL = ids[3], FAIL_ONCE = "", DEFER = "1", LAST_EXEC = ids[1] }
    end)
    assert.same({ "Started", "Failed" }, events(ids[3]))
    local cause = admin:one("SELECT cause FROM work_history WHERE machine_id = $1 AND event = 'Failed'", ids[3]).cause
    assert.matches("deferred with tx:defer", cause, 1, true)
    for _, m in ipairs({ ids[1], ids[2], ids[4] }) do assert.same({ "Started", "Finished" }, events(m)) end
    assert.equal(3, count("SELECT 1 FROM batch WHERE done AND runs = 1"))
    assert.equal(3, count([[SELECT DISTINCT xmin::TEXT FROM work_history
                            WHERE event = 'Finished' AND machine_id IN (SELECT machine_id FROM batch)]]))
  end)

  it("finishes every member alone when a failure the batch may not survive ends it", function()
    local ids = run_batch(batch_script("batch_retry"), function(ids) return { BAD = "", BAD_SQL = "", FAIL_ONCE = ids[3] } end)
    for _, m in ipairs(ids) do assert.same({ "Started", "Finished" }, events(m)) end
    -- nothing of the failed batch committed: each item's write landed once,
    -- in a transaction of its own, the commit functions having run again
    assert.equal(0, count("SELECT 1 FROM batch WHERE NOT done OR runs <> 1"))
    assert.equal(4, count([[SELECT DISTINCT xmin::TEXT FROM work_history
                            WHERE event = 'Finished' AND machine_id IN (SELECT machine_id FROM batch)]]))
  end)

  -- A commit function that yields in a coroutine the body then abandons
  -- holds what its finish holds for the host: at one slot the claim turn
  -- (its finish also claims), at several a place in a batch (and the use
  -- of its transaction, after a statement). The body's end
  -- must let go of them, or this host never claims again.
  it("claims again after a commit function yielded in a coroutine that was never resumed", function()
    local a, b = unpack(machines(2))
    H.write_file(dir .. "/yield.lua", string.format([[
      local bmdb = require "bmdb"
      local A = %q
      return { bmdb.worker { process = "Yielded", concurrency = 1, poll = 0.1,
        select = function(tx, limit)
          return tx:query([=[SELECT y.machine_id FROM yielded y WHERE NOT EXISTS (SELECT 1 FROM work_history h
            WHERE h.machine_id = y.machine_id AND h.event = 'Finished') AND NOT EXISTS (SELECT 1
            FROM work_blocked k WHERE k.machine_id = y.machine_id AND k.process = 'Yielded') LIMIT $1]=], limit)
        end,
        run = function(w)
          local function finish()
            w:finish(function(tx)
              tx:exec("UPDATE yielded SET done = true WHERE machine_id = $1", w.machine)
              if w.machine == A then coroutine.yield() end
            end)
          end
          if w.machine == A then coroutine.wrap(finish)() else finish() end
        end } }
    ]], a))
    admin:exec("INSERT INTO yielded (machine_id) VALUES ($1)", a)
    local h = start_host(dir .. "/yield.lua")
    H.wait_until(function() return #events(a) == 2 end, 30, "A to be decided")
    admin:exec("INSERT INTO yielded (machine_id) VALUES ($1)", b)
    H.wait_until(function() return #events(b) == 2 end, 30, "B to be claimed and finished after it")
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
    assert.matches("rolled back a transaction the body left open", h:stderr())
    -- A's yielded commit function was rolled back; the body's end finished it
    assert.same({ "Started", "Finished" }, events(a))
    assert.same({ "Started", "Finished" }, events(b))
    assert.is_false(admin:one("SELECT done FROM yielded WHERE machine_id = $1", a).done)
    assert.is_true(admin:one("SELECT done FROM yielded WHERE machine_id = $1", b).done)
  end)

  it("fails a raising body into backoff and retries after it", function()
    H.write_file(dir .. "/flaky.lua", [[
      local bmdb = require "bmdb"
      return {
        bmdb.worker {
          process = "Flaky", poll = 0.2, backoff = { initial = 1 },
          select = function(tx, limit)
            return tx:query([=[SELECT m.machine_id FROM machines m
              WHERE m.machine_id = $2 AND NOT EXISTS (SELECT 1 FROM work_history h
                WHERE h.machine_id = m.machine_id AND h.process = 'Flaky' AND h.event = 'Finished')
              AND NOT EXISTS (SELECT 1 FROM work_blocked b WHERE b.machine_id = m.machine_id AND b.process = 'Flaky')
              LIMIT $1]=], limit, os.getenv("MACHINE"))
          end,
          run = function(w)
            if w.attempt == 1 then error("first try fails") end
          end,
        },
      }
    ]])
    local m = machines(1)[1]
    local h = start_host(dir .. "/flaky.lua", {}, { MACHINE = m })
    H.wait_until(function() return #events(m) >= 4 end, 30, "a failure and a retry")
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
    assert.same({ "Started", "Failed", "Started", "Finished" }, events(m))
    local gap = admin:one([[SELECT (SELECT occurred_at FROM work_history WHERE machine_id = $1 AND event = 'Started'
                                    ORDER BY occurred_at DESC LIMIT 1)
                                 - (SELECT occurred_at FROM work_history WHERE machine_id = $1 AND event = 'Failed')
                                 >= INTERVAL '1 second' AS waited]], m)
    assert.is_true(gap.waited, "the retry came before the backoff ended")
    assert.matches("first try fails", admin:one("SELECT cause FROM work_history WHERE machine_id = $1 AND event = 'Failed'", m).cause)
    assert.matches('msg="work failed"', h:stderr(), 1, true)
  end)

  -- Works the machines listed in `wanted` once each; HOLD seconds per item.
  local blocker = [[
    local bmdb = require "bmdb"
    return {
      bmdb.worker {
        process = "Block", concurrency = tonumber(os.getenv("SLOTS") or "2"), poll = tonumber(os.getenv("POLL") or "0.2"),
        select = function(tx, limit)
          return tx:query([=[SELECT w.machine_id FROM wanted w
            WHERE NOT EXISTS (SELECT 1 FROM work_history h WHERE h.machine_id = w.machine_id
                              AND h.process = 'Block' AND h.event IN ('Finished', 'Canceled'))
            AND NOT EXISTS (SELECT 1 FROM work_blocked b WHERE b.machine_id = w.machine_id AND b.process = 'Block')
            LIMIT $1]=], limit)
        end,
        run = function(w)
          io.stdout:write("running ", w.machine, "\n"); io.stdout:flush()
          bmdb.sleep(tonumber(os.getenv("HOLD")))
        end,
      },
    }
  ]]

  local function want(ids)
    for _, m in ipairs(ids) do admin:exec("INSERT INTO wanted VALUES ($1)", m) end
  end

  it("lets another host take a machine within about one interval after kill -9", function()
    H.write_file(dir .. "/block.lua", blocker)
    local m = machines(1)[1]
    want { m }
    local a = start_host(dir .. "/block.lua", {}, { HOLD = "600" })
    H.wait_until(function() return a:stdout():match("running") end, 20, "host A to take the machine")
    local b = start_host(dir .. "/block.lua", {}, { HOLD = "0" })
    H.wait_until(function() return b:stderr():match("workers started") end, 20, "host B to start")
    local killed = H.now()
    a:kill("KILL")
    H.wait_until(function() return b:stdout():match("running") end, 2 * 2 + 5, "host B to take over")
    print(string.format("\n  takeover after kill -9: %.2fs (interval 2s)", H.now() - killed))
    H.wait_until(function() return events(m)[4] == "Finished" end, 10, "host B to finish")
    assert.same({ "Started", "Abandoned", "Started", "Finished" }, events(m))
    b:kill("TERM")
    assert.equal(0, b:wait(30))
  end)

  it("drains on SIGTERM: the item in flight finishes, nothing new is claimed", function()
    H.write_file(dir .. "/block.lua", blocker)
    local ids = machines(3)
    want { ids[1] }
    local h = start_host(dir .. "/block.lua", {}, { HOLD = "1" })
    H.wait_until(function() return h:stdout():match("running") end, 20, "an item in flight")
    -- the other two become eligible only now: a draining host must not take them
    h:kill("TERM")
    H.wait_until(function() return h:stderr():match("draining") end, 10, "the drain to start")
    want { ids[2], ids[3] }
    admin:exec("SELECT pg_notify('bmdb_wake', 'Block')")
    assert.equal(0, h:wait(30), h:stderr())
    assert.same({ "Started", "Finished" }, events(ids[1]))
    assert.same({}, events(ids[2]))
    assert.equal(0, count("SELECT 1 FROM sessions WHERE runtime_info LIKE $1", "%:" .. h.pid))
  end)

  -- A worker with `ahead` locks more items in a claim than its slots
  -- need; they wait in the host's queue, and a slot takes the oldest when
  -- it comes back for its next item, so one select and lock serve several
  -- items. GATE: the bodies wait until that file exists (from the
  -- GATE_FROM-th body this slot runs on).
  local ahead_script = [[
    local bmdb = require "bmdb"
    local function exists(path)
      local f = io.open(path)
      if f then f:close() end
      return f ~= nil
    end
    local bodies = 0
    local worker = bmdb.worker {
      -- AHEAD=default: the field is left out
      process = "Ahead", concurrency = tonumber(os.getenv("CONCURRENCY") or "1"),
      ahead = tonumber(os.getenv("AHEAD") or "4"), poll = 0.2,
      timeout = tonumber(os.getenv("TIMEOUT") or ""), batch = tonumber(os.getenv("BATCH") or ""),
]] .. wanted_select("Ahead") .. [[
      run = function(w)
        io.stdout:write("running ", w.machine, "\n"); io.stdout:flush()
        local gate = os.getenv("GATE")
        bodies = bodies + 1
        if bodies < tonumber(os.getenv("GATE_FROM") or "1") then gate = nil end
        while gate and not exists(gate) do bmdb.sleep(0.02) end
        if os.getenv("HOLD") then bmdb.sleep(tonumber(os.getenv("HOLD"))) end
        w:finish()
      end,
    }
    -- CONFLICT_AT=n: the n-th select fails to serialize, as when another
    -- host's claim meets this one
    local selects, select = 0, worker.select
    worker.select = function(tx, limit)
      io.stdout:write("limit ", limit, "\n"); io.stdout:flush()
      selects = selects + 1
      if selects == tonumber(os.getenv("CONFLICT_AT") or "") then
        tx:exec("DO $$ BEGIN RAISE EXCEPTION 'a conflict' USING ERRCODE = 'serialization_failure'; END $$")
      end
      return select(tx, limit)
    end
    return { worker }
  ]]

  -- The ahead script over n new machines, all wanted; env.GATE = true
  -- stands for a gate file not there yet. Returns the host, the machines
  -- and the gate's path.
  local function start_ahead(n, args, env)
    H.write_file(dir .. "/ahead.lua", ahead_script)
    local ids = machines(n)
    want(ids)
    local gate = dir .. "/ahead-gate"
    os.remove(gate)
    if env and env.GATE then env.GATE = gate end
    return start_host(dir .. "/ahead.lua", args, env), ids, gate
  end

  -- ids as a UUID[] parameter
  local function uuids(ids) return "{" .. table.concat(ids, ",") .. "}" end

  -- The ahead script over n new machines, the only ones wanted, run until
  -- every item finished and then drained: each ran once, none was left to
  -- the stray sweep, no work row is left. Returns the host and machines.
  local function drain_ahead(n, env)
    admin:exec("DELETE FROM wanted")
    local h, ids = start_ahead(n, {}, env)
    H.wait_until(function()
      return count("SELECT 1 FROM work_history WHERE machine_id = ANY($1::UUID[]) AND event = 'Finished'",
                   uuids(ids)) == n
    end, 60, "the " .. n .. " items")
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
    assert.not_matches("no slot of this host holds", h:stderr(), 1, true)
    for _, m in ipairs(ids) do assert.same({ "Started", "Finished" }, events(m)) end
    assert.equal(0, count("SELECT 1 FROM work"))
    return h, ids
  end

  it("claims ahead of its slot for a worker with `ahead`, and runs each item once", function()
    local h, ids = start_ahead(20)
    H.wait_until(function()
      return count("SELECT 1 FROM work_history WHERE process = 'Ahead' AND event = 'Finished'") == 20
    end, 60, "the 20 items")
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
    for _, m in ipairs(ids) do assert.same({ "Started", "Finished" }, events(m)) end
    -- each claim's Started rows share its transaction's id: one slot with
    -- ahead = 4 locks five items a claim (one each without it)
    local claims = admin:one([[SELECT count(DISTINCT xmin::TEXT) AS n FROM work_history
                               WHERE process = 'Ahead' AND event = 'Started']]).n
    assert.is_true(claims <= 5, claims .. " claims for 20 items")
    assert.matches('msg="workers stopped" claims=20 ', h:stderr())
    assert.equal(0, count("SELECT 1 FROM work"))
  end)

  it("runs the items it claimed ahead when it drains, and claims nothing new", function()
    local h, ids, gate = start_ahead(6, { "--http", "127.0.0.1:0" }, { GATE = true })
    -- one item in flight, four waiting in the host's queue, which the
    -- metrics show
    H.wait_until(function() return count("SELECT 1 FROM work WHERE process = 'Ahead'") == 5 end, 20, "a claim of five")
    local port = tonumber(h:stderr():match("http listening.-address=127%.0%.0%.1:(%d+)"))
    local body
    H.wait_until(function()
      body = select(3, http.get(port, "/metrics"))
      return body and body:find('\nbmdb_items_waiting{process="Ahead"} 4\n', 1, true)
    end, 10, "four items waiting in the metrics")
    assert.truthy(body:find("\n# TYPE bmdb_items_waiting gauge\n", 1, true))
    h:kill("TERM")
    H.wait_until(function() return h:stderr():match("draining") end, 10, "the drain to start")
    H.write_file(gate, "")
    assert.equal(0, h:wait(30), h:stderr())
    local finished, untouched = 0, 0
    for _, m in ipairs(ids) do
      local e = events(m)
      if #e == 0 then untouched = untouched + 1
      else
        assert.same({ "Started", "Finished" }, e)
        finished = finished + 1
      end
    end
    assert.equal(5, finished)
    assert.equal(1, untouched)
    assert.equal(0, count("SELECT 1 FROM work"))
  end)

  -- Without `ahead`, a worker claims ahead only while its items are short
  -- (policy.lua, AHEAD_WITHIN: as many as its slots are expected to
  -- start within 10 ms), and not for a while after a conflict. One slot
  -- of no-op items: after its first eight, claims lock several. One slot
  -- of 50 ms items: every claim locks one. And one slot of no-op items
  -- whose first or third claim conflicts: every claim locks one.
  it("claims ahead by default while its items are short, and not when they are long", function()
    local function claims_for(n, env)
      local _, ids = drain_ahead(n, env)
      return admin:one([[SELECT count(DISTINCT xmin::TEXT) AS n FROM work_history
                         WHERE machine_id = ANY($1::UUID[]) AND event = 'Started']], uuids(ids)).n
    end
    local short = claims_for(40, { AHEAD = "default" })
    assert.is_true(short <= 30, short .. " claims for 40 short items")
    local long = claims_for(12, { AHEAD = "default", HOLD = "0.05" })
    assert.equal(12, long)
    -- after a conflict, before any claim ahead, a slot claims one item at
    -- a time for its next 256 claims: the first claim is one in turn,
    -- which runs again; the third is in the transaction of a batch of
    -- finishes, which then fails whole (claim.lua, in_batch)
    assert.equal(40, claims_for(40, { AHEAD = "default", CONFLICT_AT = "1" }))
    assert.equal(40, claims_for(40, { AHEAD = "default", CONFLICT_AT = "3" }))
  end)

  -- A claim locks no more than the host reads back and hands out (64,
  -- a batch's SCHED_BATCH_MAX): what a lock of more took stayed locked to no
  -- slot until the stray sweep released it. Without a `batch` of its
  -- own, a worker asks select for as many candidates as the claim locks
  -- (at least 16); with one, for that many, and locks no more.
  it("asks select for the candidates a claim locks, and never locks more than the host hands out", function()
    local function run(n, env)
      local h, ids = drain_ahead(n, env)
      local limits = {}
      for l in h:stdout():gmatch("limit (%d+)") do limits[#limits + 1] = tonumber(l) end
      local largest = admin:one([[SELECT max(n) AS n FROM (SELECT count(*) AS n FROM work_history
                                  WHERE machine_id = ANY($1::UUID[]) AND event = 'Started'
                                  GROUP BY xmin::TEXT) c]], uuids(ids)).n
      return largest, limits
    end
    -- one slot holding 32 ahead: its first claim locks 33, and asked for 33
    local largest, limits = run(40, { AHEAD = "32" })
    assert.equal(33, largest)
    assert.equal(33, limits[1])
    -- a batch of its own bounds both
    largest, limits = run(20, { AHEAD = "32", BATCH = "8" })
    assert.equal(8, largest)
    for _, l in ipairs(limits) do assert.equal(8, l) end
    -- 40 slots and 32 ahead of them, a batch of 100: claims of 64 at most
    largest = run(300, { AHEAD = "32", BATCH = "100", CONCURRENCY = "40" })
    assert.is_true(largest <= 64, largest .. " items in one claim")
  end)

  -- What a worker claimed ahead by default waits about 10 ms; when its
  -- slots are held up by longer items (here each slot's 10th, which waits
  -- for a file), what waits behind them is given back after a second
  -- (sched.h, SCHED_GIVE_BACK_S), released at once, recorded Canceled, and
  -- claimed again later. At once: the heartbeat's interval here is a
  -- minute, so an item released at its next sweep would be waited for in
  -- vain. Four slots: they claim ahead while their items take under 40 ms
  -- (one slot, under 10 ms, which an item's finish and next claim under
  -- AddressSanitizer late in the suite did not always make: nothing was
  -- claimed ahead, so nothing was given back).
  it("gives back what it claimed ahead by default when it waits long", function()
    local h, ids, gate = start_ahead(60, { "--http", "127.0.0.1:0", "--interval", "60" },
                                     { AHEAD = "default", GATE = true, GATE_FROM = "10", CONCURRENCY = "4" })
    local back = H.wait_until(function()
      return admin:one([[SELECT machine_id FROM work_history WHERE machine_id = ANY($1::UUID[])
                         AND event = 'Canceled' AND cause LIKE 'claimed ahead and given back%' LIMIT 1]],
                       uuids(ids))
    end, 30, "an item given back")
    assert.matches('msg="item claimed ahead given back: it waited in the host too long" machine=' ..
                   back.machine_id, h:stderr(), 1, true)
    -- the metrics count them. Both are read again each time: items of
    -- two claims may be given back a tick apart, and the counter moves
    -- when an item is given back, before its release commits.
    local port = tonumber(h:stderr():match("http listening.-address=127%.0%.0%.1:(%d+)"))
    local given, shown
    H.wait_until(function()
      given = count([[SELECT 1 FROM work_history WHERE machine_id = ANY($1::UUID[])
                      AND cause LIKE 'claimed ahead and given back%']], uuids(ids))
      local body = select(3, http.get(port, "/metrics"))
      shown = body and tonumber(body:match('\nbmdb_items_given_back_total{process="Ahead"} (%d+)\n'))
      return shown == given
    end, 10, function() return "given back: " .. given .. " recorded, " .. tostring(shown) .. " in the metrics" end)
    H.write_file(gate, "")
    H.wait_until(function()
      return count("SELECT 1 FROM work_history WHERE machine_id = ANY($1::UUID[]) AND event = 'Finished'",
                   uuids(ids)) == 60
    end, 60, "the 60 items")
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
    -- it ran once, after it was claimed again
    assert.same({ "Started", "Canceled", "Started", "Finished" }, events(back.machine_id))
    local out, runs, at = h:stdout(), 0, 1
    while true do
      at = out:find("running " .. back.machine_id, at, true)
      if not at then break end
      runs, at = runs + 1, at + 1
    end
    assert.equal(1, runs)
    assert.equal(0, count("SELECT 1 FROM work"))
  end)

  -- An item's timeout runs from its claim: one that passed while the item
  -- waited must not start its body (its lock is the timeout's to end).
  -- Three items of 0.7 s with a timeout of 1 s, claimed at once: the
  -- third's time is up before the slot comes back for it.
  it("does not start an item claimed ahead whose timeout passed while it waited", function()
    local h = start_ahead(3, {}, { AHEAD = "2", TIMEOUT = "1", HOLD = "0.7" })
    local skipped
    H.wait_until(function()
      skipped = h:stderr():match('msg="claimed item not started: its timeout passed while it waited"[^\n]*machine=(%S+)')
      return skipped
    end, 20, "an item not started")
    H.wait_until(function() return events(skipped)[2] end, 20, "its timeout recorded")
    assert.same({ "Started", "Failed" }, events(skipped))
    assert.is_nil(h:stdout():find("running " .. skipped, 1, true), "its body ran")
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
  end)

  it("cancels items in flight on a second signal and records them", function()
    H.write_file(dir .. "/block.lua", blocker)
    local m = machines(1)[1]
    want { m }
    local h = start_host(dir .. "/block.lua", { "--grace", "600" }, { HOLD = "600" })
    H.wait_until(function() return h:stdout():match("running") end, 20, "an item in flight")
    h:kill("TERM")
    H.wait_until(function() return h:stderr():match("draining") end, 10, "the drain to start")
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
    assert.same({ "Started", "Canceled" }, events(m))
    assert.equal(0, count("SELECT 1 FROM work"))
    assert.matches('msg="work canceled".*result=canceled cause="host shutdown"', h:stderr())
  end)

  -- A release may make a machine eligible for another process: the host
  -- folds the releases of a burst into one NOTIFY (slots.c), which wakes
  -- the idle slots of every process. Two bursts apart, each must send its
  -- own (the first must not leave the second thinking one is pending).
  it("wakes another process's idle slot with a release, burst after burst", function()
    admin:exec("CREATE TABLE staged (machine_id UUID PRIMARY KEY REFERENCES machines)")
    H.write_file(dir .. "/stages.lua", [[
      local bmdb = require "bmdb"
      local function stage(process, sql)
        return bmdb.worker { process = process, poll = 60,
          select = function(tx, limit) return tx:query(sql, limit) end,
          run = function(w) end }
      end
      return {
        stage("Stage1", [=[SELECT s.machine_id FROM staged s WHERE NOT EXISTS (SELECT 1 FROM work_history h
          WHERE h.machine_id = s.machine_id AND h.process = 'Stage1' AND h.event = 'Finished') AND NOT EXISTS
          (SELECT 1 FROM work_blocked b WHERE b.machine_id = s.machine_id AND b.process = 'Stage1') LIMIT $1]=]),
        stage("Stage2", [=[SELECT s.machine_id FROM staged s WHERE EXISTS (SELECT 1 FROM work_history h
          WHERE h.machine_id = s.machine_id AND h.process = 'Stage1' AND h.event = 'Finished') AND NOT EXISTS
          (SELECT 1 FROM work_history h WHERE h.machine_id = s.machine_id AND h.process = 'Stage2'
          AND h.event = 'Finished') AND NOT EXISTS (SELECT 1 FROM work_blocked b
          WHERE b.machine_id = s.machine_id AND b.process = 'Stage2') LIMIT $1]=]),
      }
    ]])
    -- poll 60 s: only a wake-up can explain the second stage within the bounds below
    local h = start_host(dir .. "/stages.lua", { "--log-level", "debug" })
    H.wait_until(function()
      local _, idle = h:stderr():gsub('msg="slot idle"', "")
      return idle >= 2
    end, 20, "both processes' slots to go idle")
    local function stage2_finished(m)
      return count([[SELECT 1 FROM work_history WHERE machine_id = $1 AND process = 'Stage2'
                     AND event = 'Finished']], m) == 1
    end
    for round = 1, 2 do
      local m = machines(1)[1]
      admin:exec("INSERT INTO staged VALUES ($1)", m)
      admin:exec("SELECT pg_notify('bmdb_wake', 'Stage1')") -- the first stage, woken by hand
      H.wait_until(function() return stage2_finished(m) end, 20, "round " .. round .. "'s second stage")
    end
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
  end)

  it("picks up a newly eligible machine on NOTIFY without waiting for the poll interval", function()
    H.write_file(dir .. "/block.lua", blocker)
    -- poll 60 s: only a wake-up can explain a pick-up within the bound below
    local h = start_host(dir .. "/block.lua", { "--log-level", "debug" }, { HOLD = "0", POLL = "60" })
    H.wait_until(function()
      local _, idle = h:stderr():gsub('msg="slot idle"', "")
      return idle >= 2
    end, 20, "both slots to go idle")
    local m = machines(1)[1]
    local t0 = H.now()
    want { m }
    admin:exec("SELECT pg_notify('bmdb_wake', 'Block')")
    h:await("stdout", "running", 10)
    print(string.format("\n  NOTIFY to pick-up: %.3fs (poll interval 60s)", H.now() - t0))
    H.wait_until(function() return events(m)[2] == "Finished" end, 10, "the item to finish")
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
  end)

  it("lets idle slots take turns at polling: one polls, the others sleep until there is work", function()
    H.write_file(dir .. "/block.lua", blocker)
    local h = start_host(dir .. "/block.lua", { "--log-level", "debug" }, { HOLD = "0", POLL = "0.05", SLOTS = "6" })
    local function idle_slots()
      local slots = {}
      for slot in h:stderr():gmatch('msg="slot idle"[^\n]-slot=(%d+)') do slots[#slots + 1] = slot end
      return slots
    end
    -- Every slot finds nothing once at start; after that only the poller
    -- polls. (A slot that starts late may take the post over once, while
    -- the poller is out polling: hence at most two.)
    H.wait_until(function() return #idle_slots() >= 6 + 30 end, 30, "36 empty polls")
    local slots, seen, distinct = idle_slots(), {}, 0
    for i = #slots - 19, #slots do
      if not seen[slots[i]] then seen[slots[i]], distinct = true, distinct + 1 end
    end
    assert.is_true(distinct <= 2, "slots that polled among the last 20 polls: " .. table.concat(slots, " ", #slots - 19))
    -- Work that appears without a NOTIFY is still found, all of it.
    local ms = machines(6)
    want(ms)
    H.wait_until(function()
      local _, running = h:stdout():gsub("running", "")
      return running >= 6
    end, 30, "all six machines to be taken")
    H.wait_until(function()
      return count("SELECT 1 FROM work_history WHERE event = 'Finished' AND machine_id = ANY($1::UUID[])",
        "{" .. table.concat(ms, ",") .. "}") == 6
    end, 30, "all six to finish")
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
  end)

  it("lets items in flight see a lost session, then carries on with a new one", function()
    H.write_file(dir .. "/lose.lua", [[
      local bmdb = require "bmdb"
      return {
        bmdb.worker {
          process = "Lose", poll = 0.1,
]] .. wanted_select("Lose") .. [[
          run = function(w)
            io.stdout:write("running ", w.machine, " ", w.session_id, "\n"); io.stdout:flush()
            local mark = os.getenv("MARK")
            if os.getenv("LOSE") == w.machine and not io.open(mark) then
              io.open(mark, "w"):close() -- only the first time
              while w:alive() do pcall(bmdb.sleep, 0.05) end
              local ok, err = pcall(bmdb.transact, function(tx) tx:exec("INSERT INTO machines DEFAULT VALUES") end)
              io.stdout:write("lost ", tostring(ok), " ", tostring(err), "\n"); io.stdout:flush()
            end
          end,
        },
      }
    ]])
    local m = machines(1)[1]
    want { m }
    local before = count("SELECT 1 FROM machines")
    local h = start_host(dir .. "/lose.lua", {}, { LOSE = m, MARK = dir .. "/lost-once" })
    local session = H.wait_until(function() return h:stdout():match("running " .. m:gsub("%-", "%%-") .. " (%S+)") end,
      20, "the item")
    admin:exec("DELETE FROM sessions WHERE session_id = $1", session)
    H.wait_until(function() return h:stdout():match("lost") end, 20, "the body to see the loss")
    assert.matches("lost false session expired", h:stdout(), 1, true)
    h:await("stderr", 'msg="work lost"')
    assert.equal(before, count("SELECT 1 FROM machines")) -- the dead session committed nothing
    local m2 = machines(1)[1]
    want { m2 }
    local other = H.wait_until(function() return h:stdout():match("running " .. m2:gsub("%-", "%%-") .. " (%S+)") end,
      20, "the next item")
    assert.not_equal(session, other)
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
  end)

  it("survives a database outage and works on with a new session", function()
    local pg = H.postgres { fresh = true }
    local odsn = pg:create_db()
    assert.equal(0, (H.run({ H.bin, "migrate" }, { env = { BMDB_DSN = odsn } })))
    local c = core.connect(odsn)
    c:exec("CREATE TABLE wanted (machine_id UUID PRIMARY KEY REFERENCES machines)")
    c:close()
    H.write_file(dir .. "/block.lua", blocker)
    local h = H.spawn { argv = { H.bin, "--interval", "1", dir .. "/block.lua" }, env = { BMDB_DSN = odsn, HOLD = "0" } }
    H.wait_until(function() return h:stderr():match("workers started") end, 20, "the host")
    pg:stop("fast")
    H.wait_until(function() return h:stderr():match("session lost") end, 20, "the host to give up its session")
    pg:start()
    H.wait_until(function() return select(2, h:stderr():gsub('msg="session started"', "")) >= 2 end, 30,
      "a new session after the outage")
    assert.is_true(h:running())
    c = core.connect(odsn)
    local m = c:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
    c:exec("INSERT INTO wanted VALUES ($1)", m)
    H.wait_until(function() return h:stdout():find("running " .. m, 1, true) end, 20, "work after the outage")
    c:close()
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
    pg:stop()
  end)

  it("logs work events as JSON with --log-format json", function()
    H.write_file(dir .. "/block.lua", blocker)
    local m = machines(1)[1]
    want { m }
    local h = start_host(dir .. "/block.lua", { "--log-format", "json" }, { HOLD = "0" })
    H.wait_until(function() return h:stderr():find('"msg":"work finished"', 1, true) end, 20, "a JSON work line")
    local line = h:stderr():match('[^\n]*"msg":"work finished"[^\n]*')
    assert.matches('^{"time":"[^"]+","level":"info","msg":"work finished",', line)
    assert.matches('"machine":"' .. m .. '"', line, 1, true)
    assert.matches('"process":"Block"', line, 1, true)
    assert.matches('"duration":"[%d.]+s"', line)
    h:kill("TERM")
    assert.equal(0, h:wait(30))
  end)
end)
