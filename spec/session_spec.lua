-- Sessions: heartbeats, the local deadline, fencing, collection.
local H = require "support.helpers"
local bmdb = require "bmdb"
local core = require "bmdb.core"

local failure = H.failure

describe("sessions", function()
  local dsn, admin

  setup(function() dsn, admin = H.open_core("session_spec") end)

  teardown(function()
    core.pause_heartbeat(false)
    H.close_core(admin)
  end)

  after_each(function() core.pause_heartbeat(false) end)

  it("registers the session with component, runtime info and interval", function()
    local s = bmdb.session()
    assert.is_true(s.alive)
    local row = admin:one("SELECT component_name, runtime_info, interval_seconds, deadline > now() AS live " ..
                          "FROM sessions WHERE session_id = $1", s.id)
    assert.same({ component_name = "session_spec", runtime_info = row.runtime_info,
                  interval_seconds = 2, live = true }, row)
    assert.matches(":%d+$", row.runtime_info)
  end)

  it("keeps the session alive across several intervals while heartbeats run", function()
    local id = bmdb.session().id
    local first = admin:one("SELECT deadline::TEXT AS d FROM sessions WHERE session_id = $1", id).d
    H.wait_until(function()
      local row = admin:one("SELECT deadline::TEXT AS d FROM sessions WHERE session_id = $1", id)
      return row and row.d ~= first
    end, 5, "the heartbeat to push the deadline")
    assert.equal(id, bmdb.session().id)
  end)

  it("expires when heartbeats stop, locally before the database does", function()
    local s = core.session()
    core.pause_heartbeat(true)
    H.wait_until(function() return not s:alive() end, 5, "the local deadline to pass")
    -- Guarantee 3: at the moment we gave up, the database still believed in us.
    local row = admin:one("SELECT deadline > now() AS live FROM sessions WHERE session_id = $1", s:id())
    assert.is_true(row.live)
    H.wait_until(function()
      return admin:one("SELECT deadline <= now() AS dead FROM sessions WHERE session_id = $1", s:id()).dead
    end, 5, "the database deadline to pass")
  end)

  it("fences: a transaction of a dead session commits nothing", function()
    local s = core.session()
    local tx = core.begin(s)
    local id = tx:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
    core.pause_heartbeat(true)
    H.wait_until(function() return not s:alive() end, 5, "the session to expire")
    local err = failure(tx.commit, tx)
    assert.equal("session_expired", err.kind)
    assert.equal("session expired", tostring(err))
    assert.equal(0, admin:one("SELECT count(*) AS n FROM machines WHERE machine_id = $1", id).n)
    -- and a new transaction on that session is refused at once
    err = failure(core.begin, s)
    assert.equal("session_expired", err.kind)
  end)

  it("fences on the database too: a deleted session row fails the next transaction", function()
    local s = core.session()
    -- Paused, the heartbeat cannot learn of the deletion before the fence
    -- does (it would fail core.begin instead).
    core.pause_heartbeat(true)
    admin:exec("DELETE FROM sessions WHERE session_id = $1", s:id())
    -- The fence rides with the transaction's first statement (tx.h), so
    -- that statement is what fails, and nothing it did stays.
    local tx = core.begin(s)
    local err = failure(tx.one, tx, "INSERT INTO machines DEFAULT VALUES RETURNING machine_id")
    assert.equal("session_expired", err.kind)
    assert.is_false(s:alive())
    assert.equal("session_expired", failure(tx.commit, tx).kind)
  end)

  it("fences deferred statements: a dead session's transaction of deferred statements commits none", function()
    local s = core.session()
    -- Paused right after a heartbeat, the session stays alive locally
    -- for about an interval: what refuses the commit is the fence.
    local last = admin:one("SELECT deadline::TEXT AS d FROM sessions WHERE session_id = $1", s:id()).d
    H.wait_until(function()
      return admin:one("SELECT deadline::TEXT AS d FROM sessions WHERE session_id = $1", s:id()).d ~= last
    end, 10, "a heartbeat", 0.005)
    core.pause_heartbeat(true)
    admin:exec("DELETE FROM sessions WHERE session_id = $1", s:id())
    local id = admin:one("SELECT gen_random_uuid()::TEXT AS id").id
    local tx = core.begin(s)
    -- BEGIN, the fence, the deferred INSERT and COMMIT go in one flight;
    -- the fence raises, so neither of the two behind it runs.
    tx:defer("INSERT INTO machines (machine_id) VALUES ($1)", id)
    assert.equal("session_expired", failure(tx.commit, tx).kind)
    assert.is_false(s:alive())
    assert.equal(0, admin:one("SELECT count(*) AS n FROM machines WHERE machine_id = $1", id).n)
  end)

  it("starts a new session for new work after a loss", function()
    local old = core.session()
    admin:exec("DELETE FROM sessions WHERE session_id = $1", old:id())
    -- The fence or, if it learned first, the heartbeat reports the loss.
    local err = failure(function() core.begin(old):one("SELECT 1 AS x") end)
    assert.equal("session_expired", err.kind)
    local new
    H.wait_until(function()
      local ok, s = pcall(core.session, 0.1)
      new = ok and s or nil
      return new and new:id() ~= old:id()
    end, 5, "a new session")
    assert.is_true(new:alive())
    assert.equal(1, bmdb.transact(function(tx) return tx:one("SELECT 1 AS x").x end))
  end)

  it("collects expired sessions of other hosts and records their work as abandoned", function()
    local m = admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
    local dead = admin:one([[INSERT INTO sessions (component_name, runtime_info, interval_seconds, deadline)
                             VALUES ('crashed', 'elsewhere:1', 1, now() - INTERVAL '1 second')
                             RETURNING session_id]]).session_id
    admin:exec("INSERT INTO work (machine_id, process, session_id) VALUES ($1, 'Provision', $2)", m, dead)
    H.wait_until(function()
      return admin:one("SELECT count(*) AS n FROM sessions WHERE session_id = $1", dead).n == 0
    end, 10, "the collector to delete the expired session")
    assert.equal(0, admin:one("SELECT count(*) AS n FROM work WHERE machine_id = $1", m).n)
    local h = admin:one("SELECT event, session_id FROM work_history WHERE machine_id = $1", m)
    assert.same({ event = "Abandoned", session_id = dead }, h)
  end)
end)
