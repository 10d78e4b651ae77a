-- bmdb.work: locks, decisions, history, backoff.
local H = require "support.helpers"
local bmdb = require "bmdb"
local core = require "bmdb.core"

local failure = H.failure

describe("bmdb.work", function()
  local dsn, admin

  local function new_machine()
    return admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
  end

  local function events(m, process)
    local out = {}
    for _, r in ipairs(admin:query([[SELECT event FROM work_history WHERE machine_id = $1 AND process = $2
                                     ORDER BY occurred_at, history_id]], m, process)) do
      out[#out + 1] = r.event
    end
    return out
  end

  local function end_backoff(m, process)
    admin:exec("UPDATE work_backoff SET backoff_until = now() WHERE machine_id = $1 AND process = $2", m, process)
  end

  -- A second live session, as another host would hold it.
  local function foreign_lock(m, process)
    local other = admin:one([[INSERT INTO sessions (component_name, runtime_info, interval_seconds, deadline)
                              VALUES ('other', 'elsewhere:2', 60, now() + INTERVAL '60 seconds')
                              RETURNING session_id]]).session_id
    admin:exec("INSERT INTO work (machine_id, process, session_id) VALUES ($1, $2, $3)", m, process, other)
    return other
  end

  setup(function() dsn, admin = H.open_core("work_spec") end)

  teardown(function() H.close_core(admin) end)

  it("locks, runs the body and finishes on return", function()
    local m = new_machine()
    local seen
    local r = bmdb.work(m, "Provision", function(w)
      seen = { machine = w.machine, process = w.process, session = w.session_id, attempt = w.attempt,
               alive = w:alive() }
      seen.held = admin:one("SELECT session_id FROM work WHERE machine_id = $1", m).session_id
      return "done"
    end)
    assert.equal("done", r)
    assert.same({ machine = m, process = "Provision", session = bmdb.session().id, attempt = 1,
                  alive = true, held = bmdb.session().id }, seen)
    assert.same({ "Started", "Finished" }, events(m, "Provision"))
    assert.equal(0, admin:one("SELECT count(*) AS n FROM work WHERE machine_id = $1", m).n)
  end)

  it("commits finish's function with the release, atomically", function()
    local m = new_machine()
    admin:exec("CREATE TABLE IF NOT EXISTS provisioned (machine_id UUID PRIMARY KEY)")
    bmdb.work(m, "Provision", function(w)
      w:finish(function(tx) tx:exec("INSERT INTO provisioned VALUES ($1)", w.machine) end)
      assert.is_false(w:alive())
    end)
    assert.equal(1, admin:one("SELECT count(*) AS n FROM provisioned WHERE machine_id = $1", m).n)
    -- a failing commit function leaves the lock released as Failed, not Finished
    local m2 = new_machine()
    failure(bmdb.work, m2, "Provision", function(w)
      w:finish(function(tx) tx:exec("INSERT INTO provisioned VALUES ($1)", "not-a-uuid") end)
    end)
    assert.same({ "Started", "Failed" }, events(m2, "Provision"))
  end)

  -- The release is sent with COMMIT, in the same round trip (tx.h): it
  -- must fail by raising, or the COMMIT behind it would run. Nothing else
  -- can take our row while the item fence holds it, so the way to a
  -- release that finds no lock is a commit function that deletes it.
  it("commits nothing of a finish whose release finds its lock gone", function()
    local m = new_machine()
    admin:exec("CREATE TABLE IF NOT EXISTS provisioned (machine_id UUID PRIMARY KEY)")
    local err = failure(bmdb.work, m, "Provision", function(w)
      w:finish(function(tx)
        tx:exec("INSERT INTO provisioned VALUES ($1)", w.machine)
        tx:exec("DELETE FROM work WHERE machine_id = $1 AND process = 'Provision'", w.machine)
      end)
    end)
    assert.equal("lost", err.kind)
    assert.matches("no longer held by this session", tostring(err), 1, true)
    assert.equal(0, admin:one("SELECT count(*) AS n FROM provisioned WHERE machine_id = $1", m).n)
    -- No Finished: the finish committed nothing. The lock it could not
    -- release was in fact still ours, so the lost item was then let go
    -- as Canceled (settle_failure).
    assert.same({ "Started", "Canceled" }, events(m, "Provision"))
  end)

  -- A finish that is only its release is one flight: BEGIN, the fence,
  -- the release and COMMIT (host/tx.c). The fence must stop that COMMIT by
  -- raising: here the release alone would succeed (the work row is still
  -- there), and only the fence knows the session is past its deadline.
  it("commits nothing of a finish without a commit function once its session is past its deadline", function()
    local m = new_machine()
    local ok, err = pcall(bmdb.work, m, "Provision", function(w)
      core.pause_heartbeat(true) -- a heartbeat would move the deadline back
      admin:exec("UPDATE sessions SET deadline = now() - INTERVAL '1 second' WHERE session_id = $1", w.session_id)
      w:finish()
    end)
    core.pause_heartbeat(false)
    assert.is_false(ok)
    assert.equal("session_expired", err.kind, tostring(err))
    assert.same({ "Started" }, events(m, "Provision"))
    assert.equal(1, admin:one("SELECT count(*) AS n FROM work WHERE machine_id = $1", m).n)
  end)

  it("excludes a second holder of (machine, process) while other processes coexist", function()
    local m = new_machine()
    foreign_lock(m, "Provision")
    local err = failure(bmdb.work, m, "Provision", function() error("must not run") end)
    assert.equal("held", err.kind)
    assert.matches("already held", tostring(err))
    local ran = false
    bmdb.work(m, "AgentStart", function() ran = true end)
    assert.is_true(ran)
    -- and inside our own body, the same pair cannot be taken twice
    local m2 = new_machine()
    bmdb.work(m2, "Provision", function()
      local inner = failure(bmdb.work, m2, "Provision", function() end)
      assert.equal("held", inner.kind)
    end)
  end)

  it("takes over a lock whose holder's session has expired, at once, counting it as a failure", function()
    local m = new_machine()
    -- a holder that heartbeat after the server started: one from before
    -- was lost to the database and would not count (work-control.md)
    H.wait_until(function()
      return admin:one("SELECT now() - pg_postmaster_start_time() > INTERVAL '3 seconds' AS up").up
    end, 10, "the server to have run for 3 s")
    local dead = admin:one([[INSERT INTO sessions (component_name, runtime_info, interval_seconds, deadline)
                             VALUES ('crashed', 'elsewhere:3', 1, now() - INTERVAL '1 second')
                             RETURNING session_id]]).session_id
    admin:exec("INSERT INTO work (machine_id, process, session_id) VALUES ($1, 'Provision', $2)", m, dead)
    -- the takeover frees the lock now; the dead holder's item failed, so
    -- it backs off (1 s: no spec was stored) before it runs again
    local err = failure(bmdb.work, m, "Provision", function() error("must not run yet") end)
    assert.equal("backoff", err.kind)
    assert.equal(0, admin:one("SELECT count(*) AS n FROM work WHERE machine_id = $1", m).n)
    end_backoff(m, "Provision")
    local ran = false
    bmdb.work(m, "Provision", function(w) ran = w.attempt end)
    assert.equal(2, ran)
    local h = admin:query("SELECT event, session_id FROM work_history WHERE machine_id = $1 ORDER BY occurred_at, event", m)
    assert.same({ event = "Abandoned", session_id = dead }, h[1])
  end)

  it("fails a raising body with the error and traceback as cause, and rethrows", function()
    local m = new_machine()
    local err = failure(bmdb.work, m, "Recover", function() error("provider said no") end,
                        { backoff = { initial = 5 } })
    assert.matches("provider said no", tostring(err))
    assert.same({ "Started", "Failed" }, events(m, "Recover"))
    local b = admin:one("SELECT cause, last_seconds, attempts, backoff_until > now() AS active " ..
                        "FROM work_backoff WHERE machine_id = $1", m)
    assert.matches("provider said no", b.cause)
    assert.matches("stack traceback", b.cause)
    assert.equal(5, b.last_seconds)
    assert.equal(1, b.attempts)
    assert.is_true(b.active)
  end)

  it("refuses a machine in backoff until it ends", function()
    local m = new_machine()
    bmdb.work(m, "Recover", function(w) w:fail("flaky", { initial = 60 }) end)
    local err = failure(bmdb.work, m, "Recover", function() error("must not run") end)
    assert.equal("backoff", err.kind)
    assert.matches("in backoff for Recover until", tostring(err))
    end_backoff(m, "Recover")
    local attempt
    bmdb.work(m, "Recover", function(w) attempt = w.attempt end)
    assert.equal(2, attempt)
  end)

  it("grows backoff by the rules on consecutive failures and resets after finish", function()
    local m = new_machine()
    local spec = { initial = 2, maximum = 10, exponent = 2 }
    local periods, attempts = {}, {}
    for _ = 1, 5 do
      bmdb.work(m, "Recover", function(w)
        attempts[#attempts + 1] = w.attempt
        w:fail("still broken", spec)
      end)
      periods[#periods + 1] = admin:one("SELECT last_seconds FROM work_backoff WHERE machine_id = $1", m).last_seconds
      end_backoff(m, "Recover")
    end
    assert.same({ 2, 4, 8, 10, 10 }, periods)
    assert.same({ 1, 2, 3, 4, 5 }, attempts)
    bmdb.work(m, "Recover", function() end)
    assert.equal(0, admin:one("SELECT count(*) AS n FROM work_backoff WHERE machine_id = $1", m).n)
    bmdb.work(m, "Recover", function(w)
      assert.equal(1, w.attempt)
      w:fail("again", spec)
    end)
    assert.equal(2, admin:one("SELECT last_seconds FROM work_backoff WHERE machine_id = $1", m).last_seconds)
  end)

  it("records Canceled on w:cancel and keeps the backoff as it was", function()
    local m = new_machine()
    bmdb.work(m, "Reboot", function(w) w:cancel() end)
    assert.same({ "Started", "Canceled" }, events(m, "Reboot"))
    assert.equal(0, admin:one("SELECT count(*) AS n FROM work_backoff WHERE machine_id = $1", m).n)
    local err = failure(bmdb.work, m, "Reboot", function(w) w:cancel(); w:finish() end)
    assert.matches("already decided (Canceled)", tostring(err), 1, true)
  end)

  it("try_work returns nil and the error for a pair held elsewhere or in backoff, and raises the rest", function()
    local m = new_machine()
    local r, err = bmdb.try_work(m, "Try", function(w)
      local inner_r, inner = bmdb.try_work(m, "Try", function() end)
      assert.is_nil(inner_r)
      assert.equal("held", inner.kind)
      w:fail("broken", 60)
    end)
    assert.is_nil(r)
    assert.is_nil(err)
    r, err = bmdb.try_work(m, "Try", function() error("must not run") end)
    assert.is_nil(r)
    assert.equal("backoff", err.kind)
    assert.is_string(err.backoff_until)
    assert.is_nil(rawget(err, "until_"))
    assert.equal("done", (bmdb.try_work(new_machine(), "Try", function() return "done" end)))
    err = failure(bmdb.try_work, "machine-1", "Try", function() end)
    assert.truthy(bmdb.is_error(err, "usage"), tostring(err))
  end)

  it("exposes only the documented API in require 'bmdb'", function()
    local names = {}
    for k in pairs(bmdb) do names[#names + 1] = k end
    table.sort(names)
    assert.same({ "backoff_next", "cancel", "exec", "gauge", "hold", "http", "is_error", "json", "limit", "log", "loop",
                  "metrics",
                  "pause", "resume", "retry", "session", "sleep", "transact", "try_work", "unhold", "wake", "work",
                  "worker" }, names)
  end)

  it("rejects a machine id that is not a UUID and an invalid process name", function()
    local err = failure(bmdb.work, "machine-1", "Provision", function() end)
    assert.matches("bad argument #1 to 'work' (machine id is not a UUID: machine-1", tostring(err), 1, true)
    err = failure(bmdb.work, new_machine(), "bad name!", function() end)
    assert.matches('invalid process name "bad name!"', tostring(err), 1, true)
    err = failure(bmdb.work, "00000000-0000-4000-8000-000000000000", "Provision", function() end)
    assert.matches("does not exist", tostring(err))
  end)

  it("sees the lock lost when the session dies: alive() false, calls raise, finish refuses", function()
    local m = new_machine()
    local alive_after, inner
    local err = failure(bmdb.work, m, "Provision", function(w)
      admin:exec("DELETE FROM sessions WHERE session_id = $1", w.session_id)
      inner = failure(bmdb.transact, function(tx) tx:exec("INSERT INTO machines DEFAULT VALUES") end)
      alive_after = w:alive()
      w:finish()
    end)
    assert.equal("session_expired", inner.kind)
    assert.is_false(alive_after)
    assert.equal("session_expired", err.kind)
    assert.same({ "Started" }, events(m, "Provision"))
  end)
end)
