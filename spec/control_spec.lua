-- Work control: item fences, timeouts, poison pills, operator
-- cancel, pause and hold, with real hosts and a real PostgreSQL.
local H = require "support.helpers"
local bmdb = require "bmdb"
local core = require "bmdb.core"
local http = require "support.http"

describe("work control", function()
  local dsn, admin, dir

  local function start_host(script, env)
    local e = { BMDB_DSN = dsn }
    for k, v in pairs(env or {}) do e[k] = v end
    return H.spawn { argv = { H.bin, "--interval", "2", script }, env = e }
  end

  local function cli(...)
    return H.run({ H.bin, ... }, { env = { BMDB_DSN = dsn } })
  end

  local function new_machine()
    return admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
  end

  local function history(m, process)
    local out = {}
    for _, r in ipairs(admin:query([[SELECT event, cause FROM work_history WHERE machine_id = $1
                                     AND process = $2 ORDER BY occurred_at, history_id]], m, process)) do
      out[#out + 1] = r.event .. (r.event == "Failed" and r.cause and r.cause:match("^timeout") and
                                  "(" .. r.cause .. ")" or "")
    end
    return out
  end

  local function esc(text) return (text:gsub("%p", "%%%0")) end

  local function count(pattern, text)
    local n = 0
    for _ in text:gmatch(pattern) do n = n + 1 end
    return n
  end

  setup(function()
    dsn, admin = H.open_core("control_spec")
    dir = H.tmpdir("control")
    admin:exec("CREATE TABLE effects (machine_id UUID NOT NULL, attempt INT8 NOT NULL, what TEXT)")
    admin:exec("CREATE TABLE wanted (machine_id UUID NOT NULL, process TEXT NOT NULL)")
  end)

  teardown(function() H.close_core(admin) end)

  -- A worker script over `wanted`: select skips work_blocked as any select does.
  local function worker_script(name, body, extra)
    H.write_file(dir .. "/" .. name .. ".lua", [[
      local bmdb = require "bmdb"
      local function worker(process)
        return bmdb.worker {
          process = process, poll = 0.2, ]] .. (extra or "") .. [[
          select = function(tx, limit)
            return tx:query([=[SELECT w.machine_id FROM wanted w
              WHERE w.process = $2 AND NOT EXISTS (SELECT 1 FROM effects e
                WHERE e.machine_id = w.machine_id AND e.what = $2)
              AND NOT EXISTS (SELECT 1 FROM work_blocked b
                WHERE b.machine_id = w.machine_id AND b.process = $2) LIMIT $1]=], limit, process)
          end,
          run = function(w) ]] .. body .. [[ end,
        }
      end
      return { worker(os.getenv("PROCESS") or "Ctl"), os.getenv("PROCESS2") and worker(os.getenv("PROCESS2")) or nil }
    ]])
    return dir .. "/" .. name .. ".lua"
  end

  it("takes over a body past its timeout; its finish raises lost and commits nothing", function()
    local script = worker_script("timeout", [[
      if w.attempt == 1 then
        pcall(bmdb.sleep, 10) -- interrupted when the timeout passes
        local ok, err = pcall(w.finish, w, function(tx)
          tx:exec("INSERT INTO effects VALUES ($1, $2, 'Slow')", w.machine, w.attempt)
        end)
        bmdb.log.info("late finish", { ok = ok, kind = bmdb.is_error(err) and err.kind, alive = w:alive() })
        bmdb.sleep(30) -- busy: the other host must take it over
      else
        w:finish(function(tx) tx:exec("INSERT INTO effects VALUES ($1, $2, 'Slow')", w.machine, w.attempt) end)
      end
    ]], "timeout = 1, backoff = { initial = 1 },")
    local m = new_machine()
    admin:exec("INSERT INTO wanted VALUES ($1, 'Slow')", m)
    local a = start_host(script, { PROCESS = "Slow" })
    H.wait_until(function() return #history(m, "Slow") >= 1 end, 20, "the first host to claim")
    local b = start_host(script, { PROCESS = "Slow" })
    H.wait_until(function() return admin:one("SELECT count(*) AS n FROM effects WHERE machine_id = $1", m).n > 0 end,
      30, "the item to be done by another claim")
    a:await("stderr", "late finish")
    for _, h in ipairs { a, b } do h:kill("TERM") end
    for _, h in ipairs { a, b } do assert.equal(0, h:wait(40), h:stderr()) end
    assert.matches('msg="work lock taken away; interrupting the body".-reason="timeout after 1s"', a:stderr())
    assert.matches('msg="late finish" alive=false kind=lost ok=false', a:stderr())
    assert.same({ "Started", "Failed(timeout after 1s)", "Started", "Finished" }, history(m, "Slow"))
    local e = admin:query("SELECT attempt FROM effects WHERE machine_id = $1", m)
    assert.same({ { attempt = 2 } }, e) -- nothing of the first body
  end)

  it("frees the lock of a body stuck outside Lua past its timeout, and names the stuck slot", function()
    local script = worker_script("stuck", [[
      if w.attempt == 1 then
        io.popen("sleep 12"):read("*a") -- in C: no hook reaches it; back in Lua, it does
        w:finish(function(tx) tx:exec("INSERT INTO effects VALUES ($1, $2, 'Stuck')", w.machine, w.attempt) end)
      else
        w:finish(function(tx) tx:exec("INSERT INTO effects VALUES ($1, $2, 'Stuck')", w.machine, w.attempt) end)
      end
    ]], "timeout = 1, backoff = { initial = 1 },")
    local m = new_machine()
    admin:exec("INSERT INTO wanted VALUES ($1, 'Stuck')", m)
    local a = start_host(script, { PROCESS = "Stuck" })
    H.wait_until(function() return #history(m, "Stuck") >= 1 end, 20, "the first host to claim")
    local b = start_host(script, { PROCESS = "Stuck" })
    H.wait_until(function() return admin:one("SELECT count(*) AS n FROM effects WHERE machine_id = $1", m).n > 0 end,
      30, "another host to do the item while the first is stuck")
    a:await("stderr", "slot stuck")
    a:await("stderr", "result=lost")
    for _, h in ipairs { a, b } do h:kill("TERM") end
    for _, h in ipairs { a, b } do assert.equal(0, h:wait(40), h:stderr()) end
    assert.matches('msg="slot stuck: [^"]*" process=Stuck slot=1 machine=' .. esc(m), a:stderr())
    assert.same({ { attempt = 2 } }, admin:query("SELECT attempt FROM effects WHERE machine_id = $1", m))
  end)

  it("commits nothing of a body whose writes come after an operator's cancel; an idle pair exits 1", function()
    local go = dir .. "/go"
    local script = worker_script("cancel", [[
      -- the cancel frees the pair: a second claim only finishes
      if io.open(os.getenv("GO") .. ".once") then return end
      io.open(os.getenv("GO") .. ".once", "w"):close()
      bmdb.log.info("body started", {})
      pcall(function() -- the notification may interrupt the wait: fine
        while not io.open(os.getenv("GO")) do bmdb.sleep(0.05) end
      end)
      local ok, err = pcall(bmdb.transact, function(tx)
        tx:exec("INSERT INTO effects VALUES ($1, $2, 'Cancelme')", w.machine, w.attempt)
      end)
      bmdb.log.info("late write", { ok = ok, kind = bmdb.is_error(err) and err.kind, alive = w:alive(),
                                    why = bmdb.is_error(err) and err.message })
    ]])
    local m = new_machine()
    admin:exec("INSERT INTO wanted VALUES ($1, 'Cancelme')", m)
    local h = start_host(script, { PROCESS = "Cancelme", GO = go })
    h:await("stderr", "body started")
    local code, out, err = cli("cancel", m, "Cancelme", "--reason", "wrong firmware")
    assert.equal(0, code, err)
    assert.matches("canceled", out)
    h:await("stderr", "reason=\"canceled by an operator\"") -- the notification reached the host
    H.write_file(go, "")
    h:await("stderr", "late write")
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
    assert.matches(esc('msg="late write" alive=false kind=lost ok=false why="lost: the lock on ' .. m ..
                   ' Cancelme was taken away: canceled by an operator: wrong firmware"'), h:stderr())
    assert.equal(0, admin:one("SELECT count(*) AS n FROM effects WHERE machine_id = $1", m).n)
    local c = admin:one([[SELECT cause FROM work_history WHERE machine_id = $1 AND event = 'Canceled']], m)
    assert.equal("canceled by an operator: wrong firmware", c.cause)
    code, out, err = cli("cancel", m, "Cancelme")
    assert.equal(1, code, out .. err)
    assert.matches("not held", out)
    code, _, err = cli("cancel", "not-a-uuid", "Cancelme")
    assert.equal(2, code)
    assert.matches("not a UUID", err)
  end)

  it("backs off a body that os.exits its host each time by the declared spec; w.attempt counts it", function()
    local script = worker_script("poison", [[
      if w.attempt <= 3 then os.exit(3) end
      w:finish(function(tx) tx:exec("INSERT INTO effects VALUES ($1, $2, 'Poison')", w.machine, w.attempt) end)
    ]], "backoff = { initial = 1, maximum = 60, exponent = 2 },")
    local m = new_machine()
    admin:exec("INSERT INTO wanted VALUES ($1, 'Poison')", m)
    for i, period in ipairs { 1, 2, 4 } do
      local h = start_host(script, { PROCESS = "Poison" })
      assert.equal(3, h:wait(60), h:stderr())
      local b = admin:one("SELECT last_seconds, attempts FROM work_backoff WHERE machine_id = $1 AND process = 'Poison'", m)
      assert.same({ last_seconds = period, attempts = i }, b)
    end
    local h = start_host(script, { PROCESS = "Poison" })
    H.wait_until(function() return admin:one("SELECT attempt FROM effects WHERE machine_id = $1", m) end, 30,
      "the fourth try")
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
    assert.equal(4, admin:one("SELECT attempt FROM effects WHERE machine_id = $1", m).attempt)
  end)

  it("pauses a process and holds a machine on every host, through a restart", function()
    local script = worker_script("pause", [[
      w:finish(function(tx) tx:exec("INSERT INTO effects VALUES ($1, $2, $3)", w.machine, w.attempt, w.process) end)
    ]])
    local env = { PROCESS = "Paw", PROCESS2 = "Claw" }
    local function done(m, p)
      return admin:one("SELECT count(*) AS n FROM effects WHERE machine_id = $1 AND what = $2", m, p).n > 0
    end
    assert.equal(0, (cli("pause", "Paw", "--reason", "db upgrade")))
    local hosts = { start_host(script, env), start_host(script, env) }
    for _, h in ipairs(hosts) do h:await("stderr", 'msg="process paused: no claims until it is resumed" process=Paw reason="db upgrade"') end
    local held, free = new_machine(), new_machine()
    local code, _, err = cli("hold", held, "--reason", "person at the rack")
    assert.equal(0, code, err)
    for _, m in ipairs { held, free } do
      admin:exec("INSERT INTO wanted VALUES ($1, 'Paw'), ($1, 'Claw')", m)
    end
    H.wait_until(function() return done(free, "Claw") end, 20, "Claw to do the free machine")
    local _, status = cli("status")
    assert.matches("paused processes %(1%)", status)
    assert.matches("Paw%s+%d+%s+db upgrade", status) -- process, seconds paused, reason
    assert.matches("machines on hold %(1%)", status)
    assert.matches(esc(held) .. ".-person at the rack", status)
    -- both survive a restart of every host
    for _, h in ipairs(hosts) do h:kill("TERM") end
    for _, h in ipairs(hosts) do assert.equal(0, h:wait(30), h:stderr()) end
    local first = hosts
    hosts = { start_host(script, env), start_host(script, env) }
    for _, h in ipairs(hosts) do h:await("stderr", "process paused") end
    -- one line per host however often its slots polled meanwhile
    for _, h in ipairs(first) do assert.equal(1, count("process paused", h:stderr())) end
    assert.is_false(done(free, "Paw"))
    assert.equal(0, (cli("resume", "Paw")))
    H.wait_until(function() return done(free, "Paw") end, 20, "Paw to resume")
    for _, h in ipairs(hosts) do h:await("stderr", "process resumed") end
    assert.is_false(done(held, "Paw") or done(held, "Claw"))
    assert.equal(0, admin:one("SELECT count(*) AS n FROM work_history WHERE machine_id = $1 AND event = 'Started'", held).n)
    assert.equal(0, (cli("unhold", held, "--reason", "done")))
    H.wait_until(function() return done(held, "Paw") and done(held, "Claw") end, 20, "the unheld machine")
    for _, h in ipairs(hosts) do h:kill("TERM") end
    for _, h in ipairs(hosts) do assert.equal(0, h:wait(30), h:stderr()) end
    local _, hist = cli("history", held)
    assert.matches("Held%s.-person at the", hist) -- the text form fits 100 columns
    assert.matches("Unheld%s.-done", hist)
  end)

  it("fences an item whose pair the same live session claimed again after a cancel", function()
    local m = new_machine()
    local again
    local err = H.failure(bmdb.work, m, "Refence", function(w)
      assert.is_true(bmdb.cancel(m, "Refence", "spec"))
      again = assert(require("bmdb.internal").lock(m, "Refence")) -- same session, new token
      assert.equal(w.session, again.session)
      local e = H.failure(bmdb.transact, function(tx)
        tx:exec("INSERT INTO effects VALUES ($1, 1, 'stale')", w.machine)
      end)
      assert.equal("lost", e.kind)
      assert.matches("was taken away: canceled by an operator: spec", e.message, 1, true)
      assert.is_false(w:alive())
      assert.is_true(again:alive())
      w:finish(function(tx) tx:exec("INSERT INTO effects VALUES ($1, 1, 'stale')", w.machine) end)
    end)
    assert.equal("lost", err.kind, tostring(err))
    assert.equal(0, admin:one("SELECT count(*) AS n FROM effects WHERE what = 'stale'").n)
    again:finish()
    assert.same({ "Started", "Canceled", "Started", "Finished" }, history(m, "Refence"))
  end)

  -- A pause is often asked for to quiet the database: once a host has
  -- seen it, its poller reads the pause alone, not the worker's select.
  -- The select here counts itself (a row per call, committed with the
  -- claim's transaction); the pause reads show in the table statistics
  -- of `processes`, which nothing else reads while nothing is claimed.
  it("reads only the pause, not select, while its process is paused", function()
    admin:exec("CREATE TABLE selects (at TIMESTAMPTZ NOT NULL DEFAULT now())")
    local script = dir .. "/quiet.lua"
    H.write_file(script, [[
      local bmdb = require "bmdb"
      return { bmdb.worker { process = "Quiet", poll = 0.2,
        select = function(tx, limit)
          tx:exec("INSERT INTO selects DEFAULT VALUES")
          return tx:query([=[SELECT w.machine_id FROM wanted w WHERE w.process = 'Quiet'
            AND NOT EXISTS (SELECT 1 FROM effects e WHERE e.machine_id = w.machine_id AND e.what = 'Quiet')
            AND NOT EXISTS (SELECT 1 FROM work_blocked b WHERE b.machine_id = w.machine_id
                            AND b.process = 'Quiet') LIMIT $1]=], limit)
        end,
        run = function(w)
          w:finish(function(tx) tx:exec("INSERT INTO effects VALUES ($1, $2, 'Quiet')", w.machine, w.attempt) end)
        end } }
    ]])
    local function selects() return admin:one("SELECT count(*) AS n FROM selects").n end
    local function pause_reads()
      return admin:one([[SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) AS n
                         FROM pg_stat_user_tables WHERE relname = 'processes']]).n
    end
    local function done(m)
      return admin:one("SELECT count(*) AS n FROM effects WHERE machine_id = $1 AND what = 'Quiet'", m).n > 0
    end
    assert.equal(0, (cli("pause", "Quiet", "--reason", "quiet please")))
    local m = new_machine() -- a candidate: the claim itself finds the pause
    admin:exec("INSERT INTO wanted VALUES ($1, 'Quiet')", m)
    local h = start_host(script)
    h:await("stderr", "process paused")
    local r0 = pause_reads()
    H.wait_until(function() return pause_reads() >= r0 + 2 end, 20, "the pause read again")
    local n0 = selects()
    local r1 = pause_reads()
    H.wait_until(function() return pause_reads() >= r1 + 5 end, 20, "five more reads of the pause")
    assert.equal(n0, selects())
    assert.is_false(done(m))
    assert.equal(0, (cli("resume", "Quiet")))
    H.wait_until(function() return done(m) end, 20, "the item, once resumed")
    assert.is_true(selects() > n0)
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
  end)

  -- A claim's lock rides with its COMMIT. If the connection breaks before
  -- COMMIT's answer, the host cannot know whether it landed; when it did,
  -- the rows are the live session's, so no collector ends them and
  -- work_blocked keeps the machine from every host, yet no slot runs it.
  -- The host talks to the server through a relay (spec/support/relay.lua)
  -- that lets a COMMIT after a lock land, skipping `skip` such COMMITs
  -- first, and then closes the connection instead of passing its answer
  -- on. Options: `skip`; `members`, only a COMMIT of a batch of that
  -- many finishes (host/sched.h) counts; `finish`, the COMMIT of a finish
  -- counts, lock or not; `body` and `extra`, the worker's body (by
  -- default, a finish that records its effect) and more of its fields;
  -- `later`, do not wait for the relay to fire. Returns the host, started
  -- with --http, and the relay's directory.
  local function unanswered_host(process, o)
    local relay = H.relay(dsn, { tostring(o.skip or 0), tostring(o.members or 0), o.finish and "finish" or "claim" })
    local script = worker_script("unanswered" .. process, o.body or [[
      w:finish(function(tx) tx:exec("INSERT INTO effects VALUES ($1, $2, $3)", w.machine, w.attempt, w.process) end)
    ]], o.extra)
    local h = H.spawn { argv = { H.bin, "--interval", "2", "--http", "127.0.0.1:0", script },
                        env = { BMDB_DSN = relay.dsn, PROCESS = process } }
    if not o.later then
      H.wait_until(function() return H.read_file(relay.dir .. "/fired") end, 30, "a COMMIT whose answer was lost")
    end
    return h, relay.dir
  end

  -- What the stray sweep released: its history, and the host's metric
  -- (`strays` rows released in all, 1 by default).
  local function assert_released(h, m, process, strays)
    H.wait_until(function()
      return admin:one("SELECT count(*) AS n FROM effects WHERE machine_id = $1 AND what = $2", m, process).n > 0
    end, 30, "the item, once the claim's rows were released")
    assert.same({ "Started", "Canceled", "Started", "Finished" }, history(m, process))
    assert.matches("COMMIT that got no answer", admin:one(
      "SELECT cause FROM work_history WHERE machine_id = $1 AND event = 'Canceled'", m).cause)
    h:await("stderr", 'msg="releasing a work row no slot of this host holds')
    local port = tonumber(h:stderr():match("http listening.-address=127%.0%.0%.1:(%d+)"))
    local status, why, metrics = http.get(port, "/metrics")
    assert.equal(200, status, why)
    assert.matches("\nbmdb_stray_locks_released_total " .. (strays or 1) .. "\n", metrics)
  end

  it("releases the rows of a claim whose COMMIT got no answer, and runs the item once", function()
    local m = new_machine()
    admin:exec("INSERT INTO wanted VALUES ($1, 'Unanswered')", m)
    local h = unanswered_host("Unanswered", {})
    assert_released(h, m, "Unanswered")
    assert.equal(1, admin:one("SELECT count(*) AS n FROM effects WHERE machine_id = $1", m).n)
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
  end)

  -- At one slot a finish and the next claim share a transaction (a batch
  -- of one, sched_batch.c). Losing its COMMIT's answer loses the answer to both:
  -- the finish is tried again alone and finds its item already finished;
  -- the claim's rows are strays.
  it("finishes an item and releases the next one's rows when their shared COMMIT got no answer", function()
    local first, second = new_machine(), new_machine()
    admin:exec("INSERT INTO wanted VALUES ($1, 'Shared'), ($2, 'Shared')", first, second)
    local h = unanswered_host("Shared", { skip = 1 }) -- the first claim's COMMIT passes
    local stray = H.wait_until(function()
      local r = admin:one("SELECT machine_id FROM work_history WHERE process = 'Shared' AND event = 'Canceled'")
      return r and r.machine_id
    end, 30, "the stray released")
    local done = stray == first and second or first
    assert_released(h, stray, "Shared")
    assert.same({ "Started", "Finished" }, history(done, "Shared"))
    for _, m in ipairs { first, second } do
      assert.equal(1, admin:one("SELECT count(*) AS n FROM effects WHERE machine_id = $1", m).n)
    end
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
  end)

  -- Four slots finish at once and share a transaction that also claims
  -- the next four items (host/sched.h); the relay loses that COMMIT's
  -- answer. Each member's finish is then tried alone, its commit function
  -- run again, finds its item already finished, and counts as done; the
  -- four claimed items' rows are strays. The bodies wait until four items
  -- have started, and the first four's commit functions until four
  -- members have joined (as worker_spec's batches do), so the batch is
  -- whole rather than however the timing fell.
  it("finishes each member of a batch whose COMMIT got no answer, and releases the items it claimed", function()
    local ms = {}
    for i = 1, 8 do
      ms[i] = new_machine()
      admin:exec("INSERT INTO wanted VALUES ($1, 'Batched')", ms[i])
    end
    local h = unanswered_host("Batched", { members = 4, extra = "concurrency = 4,", body = H.script_wait_for .. [[
      local core = require "bmdb.core"
      local started
      wait_for("four items started", function()
        started = bmdb.transact(function(tx)
          return tx:one("SELECT count(*) AS n FROM work_history WHERE process = 'Batched' AND event = 'Started'").n
        end)
        return started >= 4
      end)
      w:finish(function(tx)
        if started == 4 then -- the first four (the next four are claimed in their batch)
          wait_for("four members in the batch", function()
            local n = core.batch_members()
            return n == 4 or n == 0
          end)
        end
        tx:exec("INSERT INTO effects VALUES ($1, $2, $3)", w.machine, w.attempt, w.process)
      end)
    ]] })
    local strays = H.wait_until(function()
      local rows = admin:query("SELECT machine_id FROM work_history WHERE process = 'Batched' AND event = 'Canceled'")
      return #rows == 4 and rows
    end, 30, "the four claimed items' rows released")
    local stray = {}
    for _, r in ipairs(strays) do stray[r.machine_id] = true end
    for _, m in ipairs(ms) do
      if stray[m] then assert_released(h, m, "Batched", 4)
      else assert.same({ "Started", "Finished" }, history(m, "Batched")) end
    end
    H.wait_until(function()
      return admin:one("SELECT count(*) AS n FROM effects WHERE what = 'Batched'").n >= 8
    end, 30, "every item's effect")
    for _, m in ipairs(ms) do
      assert.equal(1, admin:one("SELECT count(*) AS n FROM effects WHERE machine_id = $1", m).n)
    end
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
  end)

  -- A draining host only finishes: its last finishes share a transaction
  -- (a batch, of one at one slot) that claims nothing, and the relay loses
  -- that COMMIT's answer. Each finish is tried again alone, its commit
  -- function run again; its lock is gone, so it counts as done, once, and
  -- the host ends its session and exits 0. The bodies wait for rows the
  -- spec writes after SIGTERM, so the finishes come during the drain, and
  -- at four slots each commit function first waits for the four to join.
  for _, n in ipairs { 1, 4 } do
    it(("counts a draining host's last %s as done when their COMMIT got no answer"):format(
         n == 1 and "finish" or "batch of " .. n .. " finishes"), function()
      local process, ms = "Drained" .. n, {}
      for i = 1, n do
        ms[i] = new_machine()
        admin:exec("INSERT INTO wanted VALUES ($1, $2)", ms[i], process)
      end
      local h, relay_dir = unanswered_host(process, { finish = true, members = n, later = true,
        extra = "concurrency = " .. n .. ",", body = H.script_wait_for .. [[
        local core = require "bmdb.core"
        wait_for("the go", function()
          return bmdb.transact(function(tx)
            return tx:one("SELECT count(*) AS n FROM wanted WHERE machine_id = $1 AND process = 'Go'", w.machine).n > 0
          end)
        end)
        local joined = false
        w:finish(function(tx)
          if not joined then
            joined = true
            wait_for("the finishes in one batch", function()
              local k = core.batch_members()
              return k == ]] .. n .. [[ or k == 0
            end)
          end
          tx:exec("INSERT INTO effects VALUES ($1, $2, $3)", w.machine, w.attempt, w.process)
        end)
      ]] })
      H.wait_until(function()
        return admin:one("SELECT count(*) AS n FROM work_history WHERE process = $1 AND event = 'Started'", process).n == n
      end, 20, "the items started")
      h:kill("TERM")
      h:await("stderr", "draining: no new claims")
      for _, m in ipairs(ms) do admin:exec("INSERT INTO wanted VALUES ($1, 'Go')", m) end
      H.wait_until(function() return H.read_file(relay_dir .. "/fired") end, 30, "a COMMIT whose answer was lost")
      assert.equal(0, h:wait(30), h:stderr())
      for _, m in ipairs(ms) do
        assert.same({ "Started", "Finished" }, history(m, process))
        assert.equal(1, admin:one("SELECT count(*) AS n FROM effects WHERE machine_id = $1", m).n)
        assert.equal(0, admin:one("SELECT count(*) AS n FROM work WHERE machine_id = $1", m).n)
      end
    end)
  end

  -- A select's NOT EXISTS against work_blocked stays a few primary-key
  -- lookups per candidate only while PostgreSQL expects few rows from the
  -- view. A branch that joined each paused process to every machine made
  -- it expect one row per machine, pause or not (migration 0006).
  it("keeps work_blocked's row estimate flat as the fleet grows, pause and hold included", function()
    local fleet = H.postgres():create_db()
    local code, _, err = H.run({ H.bin, "migrate" }, { env = { BMDB_DSN = fleet } })
    assert.equal(0, code, err)
    local c = core.connect(fleet)
    c:exec("INSERT INTO machines (machine_id) SELECT gen_random_uuid() FROM generate_series(1, 100000)")
    c:exec("INSERT INTO processes (process, paused_at) VALUES ('Fleet', NULL), ('Stopped', now())")
    c:exec("INSERT INTO machine_holds (machine_id) SELECT machine_id FROM machines LIMIT 3")
    c:exec("ANALYZE")
    local function estimate(process)
      local plan = c:one("EXPLAIN (FORMAT JSON) SELECT * FROM work_blocked WHERE process = $1", process)
      return tonumber(plan["QUERY PLAN"]:match('"Plan Rows":%s*(%d+)'))
    end
    assert.is_true(estimate("Fleet") < 1000, "estimate " .. estimate("Fleet"))
    assert.is_true(estimate("Stopped") < 1000, "estimate " .. estimate("Stopped"))
    -- what it still lists: the held machines, for every process
    assert.equal(3, c:one("SELECT count(*) AS n FROM work_blocked WHERE process = 'Stopped'").n)
    c:close()
  end)

  it("offers pause, resume, hold and unhold to scripts", function()
    local m = new_machine()
    assert.is_true(bmdb.pause("Scripted", "spec"))
    local e = H.failure(bmdb.work, m, "Scripted", function() error("must not run") end)
    assert.equal("held", e.kind)
    assert.matches("process Scripted is paused: spec", e.message)
    assert.is_true(bmdb.resume("Scripted"))
    assert.is_false(bmdb.resume("Scripted"))
    assert.is_true(bmdb.hold(m, "spec hold"))
    e = H.failure(bmdb.work, m, "Scripted", function() error("must not run") end)
    assert.matches(esc("machine " .. m .. " is on hold: spec hold"), e.message)
    assert.is_true(bmdb.unhold(m))
    assert.is_false(bmdb.unhold(m))
    assert.is_false(bmdb.cancel(m, "Scripted"))
    bmdb.work(m, "Scripted", function() end)
    assert.same({ "Started", "Finished" }, history(m, "Scripted"))
  end)
end)
