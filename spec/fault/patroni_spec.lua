-- Fault suite: failover on real tooling. A Patroni cluster (etcd and two
-- PostgreSQL nodes in synchronous mode, support/patroni.lua) under two
-- hosts of four slots each, connected with a multi-host DSN
-- (target_session_attrs=read-write, a short connect_timeout). Three
-- faults, one after the other: a switchover (POST /switchover), a
-- failover (POST /failover to the standby) and kill -9 of the whole
-- leader node (its Patroni and its postmaster). After each: nothing done
-- twice, no committed row lost, no lock held by a session that is gone,
-- both hosts running; the seconds from the fault until items finish again
-- go with the fault figures. The interval is chosen against Patroni's
-- ttl and loop_wait so that every failover here keeps the sessions.
local H = require "support.helpers"
local F = require "support.faults"
local P = require "support.patroni"

-- A session outlives an outage that ends before its local deadline
-- (0.9 interval after the last good heartbeat, which may be interval/2
-- old when the fault comes): 0.4 interval. A dead leader's outage is up to
-- ttl + loop_wait (its key must expire), and a second or two to promote
-- and reconnect: README, "Running in production".
local INTERVAL = math.ceil(2.5 * (P.ttl + P.loop_wait + 2))

describe("fault: failover on a Patroni cluster #slow", function()
  local cluster, dsn, admin, dir, hosts

  setup(function()
    assert(P.available(), "patroni and etcd are not installed (make deps installs them)")
    cluster = P.cluster()
    local code, out, err = H.run({ "psql", "-X", "-q", "-h", "127.0.0.1", "-p", tostring(cluster.nodes[1].port),
      "-U", "bmdb", "-d", "postgres", "-c", "CREATE DATABASE bmdb" })
    assert(code == 0, "CREATE DATABASE failed: " .. out .. err)
    dsn = cluster:dsn("bmdb") .. " connect_timeout=2"
    dsn, admin = F.prepare(dsn)
    dir = H.tmpdir("fault-patroni")
    H.write_file(dir .. "/fault.lua", F.script {})
  end)

  teardown(function()
    for _, h in ipairs(hosts or {}) do if h:running() then h:kill("KILL"); h:wait(30) end end
    if admin then admin:close() end
    if cluster then cluster:stop() end
  end)

  local function committed()
    local c = {}
    for _, h in ipairs(hosts) do F.committed(h, c) end
    return c
  end

  local function sessions_started()
    local n = 0
    for _, h in ipairs(hosts) do n = n + F.count_lines(h, 'msg="session started"') end
    return n
  end

  local function flowing(more, what)
    local before = admin:count("SELECT 1 FROM intervals")
    local ok, err = pcall(H.wait_until, function() return admin:count("SELECT 1 FROM intervals") >= before + more end,
      120, "items to flow " .. what)
    if not ok then error(err .. "\n" .. F.log_tail(hosts[1]) .. "\n" .. F.log_tail(hosts[2]), 0) end
  end

  -- Injects fault() (which returns the old leader's index), waits for a
  -- new leader and for items started after it to finish, checks the
  -- audit, and returns the seconds from the fault until items flowed
  -- again: the end of the longest pause between two finishes after it.
  local function survive(name, fault)
    flowing(40, "before the " .. name)
    local items_before = admin:count("SELECT 1 FROM intervals")
    local started = sessions_started()
    local at = admin:one("SELECT clock_timestamp()::TEXT AS t").t
    local old = fault()
    H.wait_until(function() local l = cluster:leader(); return l and l ~= old end, 120,
      "a new leader after the " .. name .. "\n" .. cluster:log(1) .. cluster:log(2))
    local promoted = admin:one("SELECT clock_timestamp()::TEXT AS t").t
    local ok, err = pcall(H.wait_until, function()
      return admin:count("SELECT 1 FROM intervals WHERE started_at > $1::TIMESTAMPTZ", promoted) >= 16
    end, 120, "items to flow again after the " .. name)
    if not ok then error(err .. "\n" .. F.log_tail(hosts[1]) .. "\n" .. F.log_tail(hosts[2]), 0) end
    local flow = tonumber(admin:one([[SELECT extract(epoch FROM e - $1::TIMESTAMPTZ)::TEXT AS s FROM
      (SELECT ended_at AS e, ended_at - lag(ended_at) OVER (ORDER BY ended_at) AS gap FROM intervals
       WHERE ended_at >= $1::TIMESTAMPTZ) q WHERE gap IS NOT NULL ORDER BY gap DESC LIMIT 1]], at).s)
    for _, h in ipairs(hosts) do
      assert.is_true(h:running(), (h.name) .. " exited after the " .. name .. ":\n" .. F.log_tail(h))
    end
    -- every lock held belongs to a live session
    assert.equal(0, admin:count([[SELECT 1 FROM work w LEFT JOIN sessions s USING (session_id)
      WHERE s.session_id IS NULL OR s.deadline <= now()]]))
    local a = F.audit(admin, committed(), false)
    local kept = sessions_started() == started
    F.figures("patroni " .. name, { items = a.items - items_before, faults = 1, survived = 1, lost = a.lost,
      overlaps = a.overlaps + a.twice, flow_s = flow })
    print(string.format("\n  %s: items flowed again %.1f s after the fault; sessions %s", name, flow,
      kept and "kept" or "started anew"))
    assert.equal(0, a.overlaps, "overlapping holders after the " .. name)
    assert.equal(0, a.twice, "items done twice after the " .. name)
    assert.equal(0, a.lost, "committed rows lost after the " .. name)
    -- a failover shorter than the interval costs no item a backoff
    assert.equal(0, admin:count("SELECT 1 FROM work_backoff WHERE cause = 'session expired'"))
    return flow
  end

  it("keeps every item once through a switchover, a failover and kill -9 of the leader node", function()
    F.machines(admin, 200, 1000000)
    hosts = {}
    for i, name in ipairs { "patA", "patB" } do
      hosts[i] = F.host(dsn, name, dir .. "/fault.lua", { interval = INTERVAL, env = { CONC = "4", HOLD = "0.01" } })
    end
    for _, h in ipairs(hosts) do h:await("stderr", "workers started", 60) end

    survive("switchover", function()
      local l = assert(cluster:leader(), "no leader")
      local code, body = cluster:api(l, "POST", "/switchover",
        ('{"leader": "%s", "candidate": "%s"}'):format(cluster.nodes[l].name, cluster.nodes[3 - l].name))
      assert(code == 200, "switchover refused: " .. code .. " " .. body)
      return l
    end)
    cluster:await_sync(120)

    survive("failover", function()
      local l = assert(cluster:leader(), "no leader")
      local code, body = cluster:api(3 - l, "POST", "/failover",
        ('{"candidate": "%s"}'):format(cluster.nodes[3 - l].name))
      assert(code == 200, "failover refused: " .. code .. " " .. body)
      return l
    end)
    cluster:await_sync(120)

    survive("kill -9 of the leader node", function()
      local l = assert(cluster:leader(), "no leader")
      cluster:kill_node(l)
      return l
    end)

    -- finish: every machine a few more times, then stop both hosts
    admin:exec("UPDATE passes SET target = n + 2")
    F.wait_complete(admin, hosts, 300)
    for _, h in ipairs(hosts) do h:kill("TERM") end
    for _, h in ipairs(hosts) do F.assert_drained(h, 60) end
    local a = F.assert_clean(admin, committed(), true)
    print(string.format("\n  %d items through 3 Patroni faults (interval %d s; ttl %d, loop_wait %d)", a.items,
      INTERVAL, P.ttl, P.loop_wait))
    assert.equal(0, admin:count("SELECT 1 FROM work"))
  end)
end)
