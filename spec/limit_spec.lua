-- bmdb.limit: rate and concurrency limits shared by every slot of every
-- host, with real hosts on a real PostgreSQL. What is counted is database
-- facts (rows and their database timestamps), never how long things took.
local H = require "support.helpers"
local http = require "support.http"
local bmdb = require "bmdb"
local core = require "bmdb.core"

describe("bmdb.limit", function()
  local dsn, admin, dir, script
  local hosts = {}

  setup(function()
    dsn, admin = H.open_core("limit_spec")
    dir = H.tmpdir("limit")
    admin:exec("CREATE TABLE wanted (machine_id UUID NOT NULL, process TEXT NOT NULL, mode TEXT NOT NULL)")
    admin:exec([[CREATE TABLE limit_log (process TEXT NOT NULL, machine_id UUID NOT NULL, what TEXT NOT NULL,
                 host TEXT, n INT8, note TEXT, at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())]])
    -- One worker; what each item does is its row's mode. Every body
    -- records something first, and select skips a machine with a record
    -- of its process (or finished), so each item runs once.
    script = dir .. "/limits.lua"
    H.write_file(script, [=[
      local bmdb = require "bmdb"
      local process, host = os.getenv("PROCESS"), os.getenv("HOST")
      local function num(k) return os.getenv(k) and tonumber(os.getenv(k)) end
      local lim
      if os.getenv("LIMIT") then
        lim = bmdb.limit(os.getenv("LIMIT"), num("CONC") and { concurrency = num("CONC"), recheck = num("RECHECK") }
                         or { rate = num("RATE"), per = num("PER"), burst = num("BURST") })
      end
      local function record(w, what, n, note)
        bmdb.transact(function(tx)
          tx:exec("INSERT INTO limit_log (process, machine_id, what, host, n, note) VALUES ($1, $2, $3, $4, $5, $6)",
                  process, w.machine, what, host, n, note)
        end)
      end
      local modes = {
        rate = function(w)
          local h = lim and lim:take()
          record(w, "took", h and h.attempts or 0)
        end,
        overlap = function(w)
          lim:run(function()
            record(w, "enter")
            bmdb.sleep(0.2)
            record(w, "leave")
          end)
        end,
        hold = function(w) -- until killed or canceled
          local h = lim:take()
          record(w, "holding", h.place, h.token)
          bmdb.sleep(600)
        end,
        holdrun = function(w) -- until the file GO exists, then gives the place back
          lim:run(function()
            record(w, "holding")
            while not io.open(os.getenv("GO")) do bmdb.sleep(0.05) end
          end)
        end,
        wait = function(w)
          record(w, "waiting")
          -- A lock taken away also interrupts the body at its next Lua
          -- call (a hook): here still inside the outer pcall.
          local took, h
          local ok, hooked = pcall(function() took, h = pcall(lim.take, lim) end)
          local err = not ok and hooked or not took and h
          if err then
            bmdb.log.info("take ended", { kind = bmdb.is_error(err) and err.kind or tostring(err) })
            error(err, 0)
          end
          record(w, "got", h.attempts, h.token)
          h:release()
        end,
      }
      return {
        bmdb.worker {
          process = process, concurrency = num("SLOTS") or 4, poll = 0.2,
          select = function(tx, limit)
            return tx:query([[SELECT w.machine_id FROM wanted w WHERE w.process = $2
              AND NOT EXISTS (SELECT 1 FROM limit_log l WHERE l.machine_id = w.machine_id AND l.process = $2)
              AND NOT EXISTS (SELECT 1 FROM work_history h WHERE h.machine_id = w.machine_id
                              AND h.process = $2 AND h.event = 'Finished')
              AND NOT EXISTS (SELECT 1 FROM work_blocked b WHERE b.machine_id = w.machine_id AND b.process = $2)
              LIMIT $1]], limit, process)
          end,
          run = function(w)
            local m = bmdb.transact(function(tx)
              return tx:one("SELECT mode FROM wanted WHERE machine_id = $1 AND process = $2", w.machine, w.process)
            end)
            return modes[m.mode](w)
          end,
        },
      }
    ]=])
  end)

  teardown(function()
    for _, h in ipairs(hosts) do h:kill("KILL", true) end
    H.close_core(admin)
  end)

  local function start_host(env, args)
    local e = { BMDB_DSN = dsn }
    for k, v in pairs(env) do e[k] = v end
    args = args or {}
    local argv = { H.bin }
    if not table.concat(args, " "):find("--interval", 1, true) then argv[2], argv[3] = "--interval", "2" end
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    argv[#argv + 1] = script
    local h = H.spawn { argv = argv, env = e }
    hosts[#hosts + 1] = h
    return h
  end

  local function stop(...)
    for _, h in ipairs { ... } do h:kill("TERM") end
    for _, h in ipairs { ... } do assert.equal(0, h:wait(60), h:stderr()) end
  end

  local function want(process, mode, n)
    local ids = {}
    for i = 1, n or 1 do
      local m = admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
      admin:exec("INSERT INTO wanted VALUES ($1, $2, $3)", m, process, mode)
      ids[i] = m
    end
    return ids
  end

  local function records(process, what)
    return admin:one("SELECT count(*) AS n FROM limit_log WHERE process = $1 AND what = $2", process, what).n
  end

  local function record(process, what)
    return admin:one("SELECT * FROM limit_log WHERE process = $1 AND what = $2", process, what)
  end

  -- The most takes recorded in any window of one second: a window holds
  -- the most when it starts at a take.
  local function busiest_second(process)
    return admin:one([[SELECT max(c) AS n FROM (SELECT (SELECT count(*) FROM limit_log b
        WHERE b.process = a.process AND b.what = 'took' AND b.at >= a.at AND b.at <= a.at + INTERVAL '1 second') AS c
      FROM limit_log a WHERE a.process = $1 AND a.what = 'took') x]], process).n
  end

  -- ---------------------------------------------------------------- in this process

  describe("specs", function()
    local function usage(field, fn, ...)
      local ok, err = pcall(fn, ...)
      assert.is_false(ok)
      assert.is_true(bmdb.is_error(err, "usage"), tostring(err))
      assert.equal(field, err.field, tostring(err))
      return err
    end

    it("refuse bad names and fields with a usage error naming the field", function()
      for _, name in ipairs { "", "1st", "has space", "x;drop", string.rep("a", 64) } do
        usage("name", bmdb.limit, name, { rate = 1 })
      end
      usage("name", bmdb.limit, 42, { rate = 1 })
      usage(nil, bmdb.limit, "ok", nil)
      usage("rate", bmdb.limit, "ok", {})
      for _, v in ipairs { 0, -1, 0 / 0, math.huge, "10" } do
        usage("rate", bmdb.limit, "ok", { rate = v })
        usage("per", bmdb.limit, "ok", { rate = 1, per = v })
        usage("concurrency", bmdb.limit, "ok", { concurrency = v })
        usage("recheck", bmdb.limit, "ok", { concurrency = 1, recheck = v })
      end
      usage("burst", bmdb.limit, "ok", { rate = 1, burst = 0.5 })
      usage("burst", bmdb.limit, "ok", { rate = 1, burst = 1.5 })
      usage("concurrency", bmdb.limit, "ok", { concurrency = 2.5 })
      usage("concurrency", bmdb.limit, "ok", { rate = 1, concurrency = 1 })
      usage("per", bmdb.limit, "ok", { concurrency = 1, per = 2 })
      usage("rat", bmdb.limit, "ok", { rat = 1 })
      usage("rate", bmdb.limit, "ok", { rate = 1e7, per = 1 })
      local lim = bmdb.limit("ok.name:with-all_kinds", { rate = 1 })
      usage("max_wait", lim.take, lim, { max_wait = -1 })
      usage("wait", lim.take, lim, { wait = 1 })
      usage(nil, lim.run, lim, "not a function")
      assert.equal(0, admin:one("SELECT count(*) AS n FROM limits").n) -- nothing was taken
    end)

    it("rate: lets a burst through at once, then refuses beyond max_wait without consuming", function()
      local lim = bmdb.limit("burst2", { rate = 1, per = 60, burst = 2 })
      assert.equal(1, lim:take { max_wait = 0 }.attempts)
      lim:take { max_wait = 0 } -- within the burst
      local tat = admin:one("SELECT tat::TEXT AS t FROM limits WHERE name = 'burst2'").t
      local ok, err = pcall(lim.take, lim, { max_wait = 0 })
      assert.is_false(ok)
      assert.is_true(bmdb.is_error(err, "limit"), tostring(err))
      assert.equal("timeout", err.reason)
      assert.equal("burst2", err.limit)
      assert.is_true(err.wait > 0 and err.wait <= 60, tostring(err.wait))
      assert.equal(tat, admin:one("SELECT tat::TEXT AS t FROM limits WHERE name = 'burst2'").t) -- nothing consumed
      -- The spec is stored on every take: the latest script wins.
      local wider = bmdb.limit("burst2", { rate = 1, per = 1, burst = 1000 })
      wider:take { max_wait = 0 }
      assert.same({ rate = 1, per = 1, burst = 1000, kind = "rate" },
        admin:one("SELECT rate, per, burst, kind FROM limits WHERE name = 'burst2'"))
    end)

    it("concurrency: hands out the lowest free places, gives them back, and refuses beyond max_wait", function()
      local lim = bmdb.limit("places3", { concurrency = 3 })
      local a, b, c = lim:take(), lim:take(), lim:take()
      assert.same({ 0, 1, 2 }, { a.place, b.place, c.place })
      local ok, err = pcall(lim.take, lim, { max_wait = 0 })
      assert.is_true(bmdb.is_error(err, "limit") and err.reason == "timeout", tostring(err))
      assert.equal(3, admin:one("SELECT count(*) AS n FROM limit_places WHERE name = 'places3'").n)
      assert.is_true(b:release())
      assert.is_false(b:release()) -- once
      assert.equal(1, lim:take().place) -- the lowest free one
      assert.is_true(lim:release()) -- the last taken: place 1
      assert.is_true(lim:release(a))
      assert.is_true(lim:release()) -- c, still held
      assert.is_false(lim:release()) -- nothing left
      assert.equal(0, admin:one("SELECT count(*) AS n FROM limit_places WHERE name = 'places3'").n)
      local s = admin:one("SELECT kind, concurrency FROM limits WHERE name = 'places3'")
      assert.same({ kind = "concurrency", concurrency = 3 }, s)
    end)

    it("concurrency: run gives the place back however fn ends, and raises fn's error as it was", function()
      local lim = bmdb.limit("runner", { concurrency = 1 })
      assert.same({ 42, "x" }, { lim:run(function(n, s) return n + 1, s end, 41, "x") })
      local raised = core.error("sql", "a body's error")
      local ok, err = pcall(lim.run, lim, function() error(raised, 0) end)
      assert.is_false(ok)
      assert.equal(raised, err) -- the same object
      assert.equal(0, admin:one("SELECT count(*) AS n FROM limit_places WHERE name = 'runner'").n)
      ok, err = pcall(lim.run, lim, function() error("plain text", 0) end)
      assert.equal("plain text", err)
      assert.equal(0, admin:one("SELECT count(*) AS n FROM limit_places WHERE name = 'runner'").n)
      assert.equal(0, lim:take { max_wait = 0 }.place) -- free
      lim:release()
    end)

    it("concurrency: a place a body took and never gave back goes back when its item ends", function()
      local lim = bmdb.limit("forgotten", { concurrency = 1 })
      local places = "SELECT count(*) AS n FROM limit_places WHERE name = 'forgotten'"
      local m = admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
      local held_inside
      bmdb.work(m, "LimitLeak", function()
        lim:take()
        held_inside = admin:one(places).n
      end)
      assert.equal(1, held_inside)
      assert.equal(0, admin:one(places).n)
      -- also when the body raised, and not twice when it gave it back
      local ok = pcall(bmdb.work, m, "LimitLeak2", function() lim:take(); error("boom", 0) end)
      assert.is_false(ok)
      assert.equal(0, admin:one(places).n)
      bmdb.work(m, "LimitLeak3", function() assert.is_true(lim:take():release()) end)
      assert.equal(0, admin:one(places).n)
      -- outside work a place is the session's until given back
      lim:take()
      assert.equal(1, admin:one(places).n)
      assert.is_true(lim:release())
    end)

    it("a name is one limit: a take of the other kind is refused", function()
      bmdb.limit("onekind", { concurrency = 2 }):run(function() end)
      local r = bmdb.limit("onekind", { rate = 5 })
      local ok, err = pcall(r.take, r)
      assert.is_true(bmdb.is_error(err, "usage"), tostring(err))
      assert.matches("onekind is a concurrency limit", err.message)
      bmdb.limit("otherkind", { rate = 5 }):take()
      local c = bmdb.limit("otherkind", { concurrency = 5 })
      ok, err = pcall(c.take, c)
      assert.is_true(bmdb.is_error(err, "usage"), tostring(err))
      assert.equal(0, admin:one("SELECT count(*) AS n FROM limit_places WHERE name = 'otherkind'").n)
    end)

    it("frees the places of a session past its deadline at the next take", function()
      local lim = bmdb.limit("expiring", { concurrency = 1 })
      lim:take()
      -- another session holds it, and has died
      local dead = admin:one([[INSERT INTO sessions (component_name, runtime_info, interval_seconds, deadline)
        VALUES ('dead', 'x', 1, now() + INTERVAL '1 hour') RETURNING session_id]]).session_id
      admin:exec("UPDATE limit_places SET session_id = $1 WHERE name = 'expiring'", dead)
      local ok, err = pcall(lim.take, lim, { max_wait = 0 })
      assert.is_true(bmdb.is_error(err, "limit"), tostring(err)) -- live: held
      admin:exec("UPDATE sessions SET deadline = now() - INTERVAL '1 second' WHERE session_id = $1", dead)
      assert.equal(0, lim:take { max_wait = 0 }.place)
      lim:release()
      admin:exec("DELETE FROM sessions WHERE session_id = $1", dead)
    end)
  end)

  -- ---------------------------------------------------------------- hosts

  -- Each take is recorded after it, by a transaction of its own: that
  -- comes later than the take by a delay, which must stay below the
  -- emission interval (1/3 s here) for the count to hold.
  it("holds a rate limit of R a second across 2 hosts x 4 slots (and the run without it is faster)", function()
    local R, burst = 3, 2
    want("Rated", "rate", 30)
    want("Unrated", "rate", 30)
    local env = { PROCESS = "Rated", LIMIT = "provider_creates", RATE = R, PER = 1, BURST = burst }
    env.HOST = "a"
    local a = start_host(env)
    env.HOST = "b"
    local b = start_host(env)
    H.wait_until(function() return records("Rated", "took") == 30 end, 60, "30 rated takes")
    stop(a, b)
    assert.equal(2, admin:one("SELECT count(DISTINCT host) AS n FROM limit_log WHERE process = 'Rated'").n)
    local most = busiest_second("Rated")
    assert.is_true(most <= R + burst, "at most " .. (R + burst) .. " takes in a second, saw " .. most)
    -- The same run without the limit goes faster than the limit allows:
    -- the count above can fail.
    a = start_host { PROCESS = "Unrated", HOST = "a" }
    b = start_host { PROCESS = "Unrated", HOST = "b" }
    H.wait_until(function() return records("Unrated", "took") == 30 end, 60, "30 unrated takes")
    stop(a, b)
    most = busiest_second("Unrated")
    assert.is_true(most > R + burst, "without the limit, more than " .. (R + burst) .. " in a second, saw " .. most)
  end)

  it("counts the waits of a limit in the host's metrics", function()
    want("Metered", "rate", 6)
    local a = start_host({ PROCESS = "Metered", LIMIT = "metered", RATE = 2, PER = 1, BURST = 1, SLOTS = 2 },
                         { "--http", "127.0.0.1:0" })
    H.wait_until(function() return records("Metered", "took") == 6 end, 60, "6 metered takes")
    local port = tonumber(a:stderr():match("http listening.-address=127%.0%.0%.1:(%d+)"))
    local status, why, metrics = http.get(port, "/metrics")
    assert.equal(200, status, why)
    stop(a)
    local waits = tonumber(metrics:match('\nbmdb_limit_waits_total{limit="metered"} (%d+)\n'))
    assert.is_true(waits ~= nil and waits >= 1, metrics)
    assert.equal(waits, tonumber(metrics:match('\nbmdb_limit_wait_seconds_count{limit="metered"} (%d+)\n')))
  end)

  it("never lets more than 3 bodies of 2 hosts x 4 slots into a concurrency limit of 3, and lets 3 in", function()
    want("Overlap", "overlap", 24)
    local env = { PROCESS = "Overlap", LIMIT = "three_at_once", CONC = 3 }
    env.HOST = "a"
    local a = start_host(env)
    env.HOST = "b"
    local b = start_host(env)
    H.wait_until(function() return records("Overlap", "leave") == 24 end, 90, "24 bodies through the limit")
    stop(a, b)
    assert.equal(2, admin:one("SELECT count(DISTINCT host) AS n FROM limit_log WHERE process = 'Overlap'").n)
    -- The most bodies between their enter and their leave at once: a leave
    -- at the same time as an enter counts first.
    local most = admin:one([[SELECT max(s) AS n FROM (SELECT sum(d) OVER (ORDER BY at, d ROWS UNBOUNDED PRECEDING) AS s
      FROM (SELECT at, CASE WHEN what = 'enter' THEN 1 ELSE -1 END AS d FROM limit_log
            WHERE process = 'Overlap' AND what IN ('enter', 'leave')) e) x]]).n
    assert.equal(3, most)
    assert.equal(0, admin:one("SELECT count(*) AS n FROM limit_places WHERE name = 'three_at_once'").n)
  end)

  it("frees the place of a killed host once its session expires: a waiter elsewhere gets it", function()
    local env = { PROCESS = "Solo", LIMIT = "solo", CONC = 1, SLOTS = 1 }
    local holder = want("Solo", "hold")[1]
    env.HOST = "a"
    local a = start_host(env) -- its one slot holds: the waiter is the other host's
    H.wait_until(function() return records("Solo", "holding") == 1 end, 30, "a host to hold the place")
    env.HOST = "b"
    local b = start_host(env, { "--log-level", "debug" })
    want("Solo", "wait")
    b:await("stderr", 'msg="waiting for a limit" limit=solo', 30)
    local killed_at = admin:one("SELECT clock_timestamp()::TEXT AS t").t
    a:kill("KILL", true)
    a:wait(10)
    H.wait_until(function() return records("Solo", "got") == 1 end, 30, "the waiter to get the dead host's place")
    local got = record("Solo", "got")
    assert.is_true(admin:one("SELECT $1::TIMESTAMPTZ > $2::TIMESTAMPTZ AS later", got.at, killed_at).later)
    assert.equal(holder, record("Solo", "holding").machine_id)
    stop(b)
  end)

  it("frees the places of a killed host when its session is collected", function()
    local env = { PROCESS = "Dying", LIMIT = "dying", CONC = 2, SLOTS = 2, HOST = "c" }
    want("Dying", "hold", 2)
    local c = start_host(env)
    H.wait_until(function() return records("Dying", "holding") == 2 end, 30, "a host to hold two places")
    local sid = admin:one("SELECT DISTINCT session_id FROM limit_places WHERE name = 'dying'").session_id
    c:kill("KILL", true)
    c:wait(10)
    -- Nobody takes: this process's own heartbeat collects the session.
    H.wait_until(function()
      return admin:one("SELECT count(*) AS n FROM sessions WHERE session_id = $1", sid).n == 0
    end, 30, "the dead session to be collected")
    assert.equal(0, admin:one("SELECT count(*) AS n FROM limit_places WHERE name = 'dying'").n)
  end)

  it("a waiting take raises lost when its item is canceled, canceled at shutdown, and gives back nothing else", function()
    -- Nothing but the fence ends these waits early: no recheck and no
    -- expiry of the holder's session (60 s sessions) within the spec.
    local env = { PROCESS = "Gate", LIMIT = "gate", CONC = 1, RECHECK = 60, HOST = "a" }
    want("Gate", "hold")
    local a = start_host(env, { "--interval", "60", "--grace", "1", "--log-level", "debug" })
    H.wait_until(function() return records("Gate", "holding") == 1 end, 30, "the holder")
    local holding = record("Gate", "holding")
    local m = want("Gate", "wait")[1]
    H.wait_until(function() return records("Gate", "waiting") == 1 end, 30, "a waiter")
    a:await("stderr", 'msg="waiting for a limit" limit=gate', 30)
    local code, _, err = H.run({ H.bin, "cancel", m, "Gate" }, { env = { BMDB_DSN = dsn } })
    assert.equal(0, code, err)
    a:await("stderr", 'msg="take ended" kind=lost', 20)
    -- The holder's place is still the holder's.
    assert.same({ { token = holding.note } },
      admin:query("SELECT token::TEXT AS token FROM limit_places WHERE name = 'gate'"))
    -- Another waiter, and the host stops: after the grace it is canceled.
    want("Gate", "wait")
    H.wait_until(function() return records("Gate", "waiting") == 2 end, 30, "a second waiter")
    H.wait_until(function()
      local _, n = a:stderr():gsub('msg="waiting for a limit" limit=gate', "")
      return n == 2
    end, 30, "the second waiter to wait")
    a:kill("TERM")
    assert.equal(0, a:wait(60), a:stderr())
    assert.matches('msg="take ended" kind=canceled', a:stderr())
    assert.equal(0, records("Gate", "got"))
  end)

  it("wakes a waiter on another host when a place is given back, before its recheck period", function()
    local go = dir .. "/go"
    -- Sessions of 60 s: a holder's session expiry wakes no waiter here.
    local env = { PROCESS = "Baton", LIMIT = "baton", CONC = 1, RECHECK = 30, GO = go, SLOTS = 1 }
    want("Baton", "holdrun")
    env.HOST = "a"
    local a = start_host(env, { "--interval", "60" })
    H.wait_until(function() return records("Baton", "holding") == 1 end, 30, "the holder")
    env.HOST = "b"
    local b = start_host(env, { "--interval", "60", "--log-level", "debug" })
    want("Baton", "wait")
    b:await("stderr", 'msg="waiting for a limit" limit=baton', 30)
    H.write_file(go, "")
    H.wait_until(function() return records("Baton", "got") == 1 end, 25, "the waiter to get the place")
    local got, waiting = record("Baton", "got"), record("Baton", "waiting")
    assert.equal("b", got.host)
    assert.is_true(got.n <= 3, "take attempts: " .. got.n) -- one look, and one more when woken
    -- Before the first recheck was due: the release woke it.
    assert.is_true(admin:one("SELECT $1::TIMESTAMPTZ < $2::TIMESTAMPTZ + INTERVAL '30 seconds' AS sooner",
      got.at, waiting.at).sooner)
    stop(a, b)
  end)

  describe("on a server without notifications", function()
    local quiet -- a DSN whose role may not call pg_notify: the releases notify nobody

    setup(function()
      admin:exec("CREATE ROLE quiet LOGIN")
      admin:exec("GRANT ALL ON ALL TABLES IN SCHEMA public TO quiet")
      admin:exec("REVOKE EXECUTE ON FUNCTION pg_notify(TEXT, TEXT) FROM PUBLIC")
      quiet = dsn:gsub("user=bmdb", "user=quiet")
    end)

    teardown(function() admin:exec("GRANT EXECUTE ON FUNCTION pg_notify(TEXT, TEXT) TO PUBLIC") end)

    it("a release wakes a waiter of its own host at once", function()
      local go = dir .. "/go_local"
      local env = { BMDB_DSN = quiet, PROCESS = "Local", LIMIT = "local", CONC = 1, RECHECK = 60, GO = go,
                    SLOTS = 2, HOST = "a" }
      want("Local", "holdrun")
      local a = start_host(env, { "--no-migrate", "--interval", "60", "--log-level", "debug" })
      H.wait_until(function() return records("Local", "holding") == 1 end, 30, "the holder")
      want("Local", "wait")
      a:await("stderr", 'msg="waiting for a limit" limit=local', 30)
      H.write_file(go, "")
      H.wait_until(function() return records("Local", "got") == 1 end, 25, "the waiter to get the place")
      local got, waiting = record("Local", "got"), record("Local", "waiting")
      assert.is_true(got.n <= 3, "take attempts: " .. got.n)
      assert.is_true(admin:one("SELECT $1::TIMESTAMPTZ < $2::TIMESTAMPTZ + INTERVAL '60 seconds' AS sooner",
        got.at, waiting.at).sooner)
      stop(a)
    end)

    it("a waiter on another host looks again every recheck period, and gets the place", function()
      local go = dir .. "/go_remote"
      local env = { BMDB_DSN = quiet, PROCESS = "Remote", LIMIT = "remote", CONC = 1, RECHECK = 0.5, GO = go,
                    SLOTS = 1 }
      want("Remote", "holdrun")
      env.HOST = "a"
      local a = start_host(env, { "--no-migrate", "--interval", "60" })
      H.wait_until(function() return records("Remote", "holding") == 1 end, 30, "the holder")
      env.HOST = "b"
      local b = start_host(env, { "--no-migrate", "--interval", "60", "--log-level", "debug" })
      want("Remote", "wait")
      b:await("stderr", 'msg="waiting for a limit" limit=remote', 30)
      H.write_file(go, "")
      H.wait_until(function() return records("Remote", "got") == 1 end, 25, "the waiter to get the place")
      local got = record("Remote", "got")
      -- One look per recheck period while it waited, and the first: a
      -- bounded number of statements, however long the wait.
      local waited = admin:one("SELECT extract(epoch FROM $1::TIMESTAMPTZ - $2::TIMESTAMPTZ)::FLOAT8 AS s",
        got.at, record("Remote", "waiting").at).s
      assert.is_true(got.n >= 2, "take attempts: " .. got.n)
      assert.is_true(got.n <= math.ceil(waited / 0.5) + 2, "take attempts: " .. got.n .. " in " .. waited .. "s")
      stop(a, b)
    end)
  end)
end)
