-- bench/run.lua -- measured figures, never asserted: `make bench`.
--
-- One PostgreSQL, started here (initdb in a temporary directory, Unix socket
-- only, as the unprivileged postgres user when run as root: the specs'
-- helpers), serves every contender, one after another, each in a fresh
-- database. Its settings are printed and written down with the figures.
--
-- 1. Reload latency: a worker host runs under --watch; we save a new
--    version of its script (write a temp file, rename it over) and time
--    (a) until the host logs the reload and (b) until an item runs on the
--    new code. Target: median under 200 ms on an idle host.
-- 2. Wake latency: an idle host with a 30 s poll interval; one statement
--    makes a machine eligible and NOTIFYs; the body notes the monotonic
--    time it starts at; eligible -> body running, median and p99.
-- 3. Throughput: ITEMS no-op items (a body that only calls w:finish with
--    one DELETE) drained by one host at concurrency 1, 4 and 16, and by 3
--    hosts x 4 slots: items/s, serialization retries per claim (each host
--    logs `claims` and `retries` when it stops), host CPU per item. Beside
--    it, at each concurrency, the peer (graphile-worker, bench/peer/, with
--    its defaults and with its batching) on the same number of no-op jobs,
--    and the ceiling: `pgbench -N` with as many clients.
-- 4. Scale: per-item cost, one slot, with 1,000 and with BIG machines in
--    the table, under a select of the shape the examples use (NOT EXISTS
--    over a state table and work_blocked); the median of SCALE_ROUNDS
--    rounds per size, the sizes alternating.
-- 5. Idle cost: statements per second that a host with 16 idle slots
--    causes (pg_stat_statements, loaded for this last part only), and its
--    RSS.
--
-- It prints one table with the ratios and rewrites the generated part of
-- BENCHMARKS.md (between its `bench:begin` and `bench:end` markers; the
-- rest of the file is kept). Every run is bounded in count and time.
-- Environment: ITEMS (10000), BIG (1000000), WAKES (200), SAVES (15),
-- PGBENCH_SECONDS (10), IDLE_SECONDS (10), BENCH_OUT (BENCHMARKS.md; "-"
-- writes nothing), BENCH_NOTE (a line written under the figures, e.g. that
-- the machine was shared).
package.path = "spec/?.lua;lua/?.lua;" .. package.path
package.cpath = "build/?.so;" .. package.cpath
local H = require "support.helpers"
local core = require "bmdb.core"

local function env_number(name, default)
  local v = os.getenv(name)
  if v == nil or v == "" then return default end
  return assert(tonumber(v), name .. " must be a number")
end

local ITEMS = env_number("ITEMS", 10000)
local BIG = env_number("BIG", 1000000)
local SMALL = 1000
local WAKES = env_number("WAKES", 200)
local SAVES = env_number("SAVES", 15)
local PGBENCH_SECONDS = env_number("PGBENCH_SECONDS", 10)
local IDLE_SECONDS = env_number("IDLE_SECONDS", 10)
local OUT = os.getenv("BENCH_OUT") or "BENCHMARKS.md"
local NOTE = os.getenv("BENCH_NOTE")
-- Scale: items skipped while the slot warms up, then items timed: as many
-- as the 1,000-machine table allows (500 timed items, under a second,
-- moved the ratio from 1.02 to 1.98 between two runs of one build).
local SCALE_WARM, SCALE_TIMED, SCALE_ROUNDS = 100, 880, 3
local CONCURRENCY = { 1, 4, 16 }
local DRAIN_TIMEOUT = 300

-- ---------------------------------------------------------------- the machine

local function sh(cmd)
  local f = io.popen(cmd .. " 2>/dev/null")
  local out = f:read("*a")
  f:close()
  return (out:gsub("%s+$", ""))
end

local NPROC = tonumber(sh("nproc")) or 1
local CLK_TCK = tonumber(sh("getconf CLK_TCK")) or 100

local function machine()
  local cpuinfo = H.read_file("/proc/cpuinfo") or ""
  local meminfo = H.read_file("/proc/meminfo") or ""
  local kb = tonumber(meminfo:match("MemTotal:%s+(%d+)")) or 0
  return {
    cpu = cpuinfo:match("model name%s*:%s*([^\n]+)") or "unknown",
    nproc = NPROC,
    memory = string.format("%.1f GiB", kb / 1024 / 1024),
    kernel = sh("uname -r"),
  }
end

local function loadavg()
  return (H.read_file("/proc/loadavg") or ""):match("^(%S+ %S+ %S+)") or "?"
end

-- User + system seconds of a process, all its threads.
-- /proc/PID/stat's fields after the command: f[2] is the parent's pid,
-- f[12] to f[15] utime, stime, cutime, cstime (fields 14 to 17). nil once
-- the process is gone.
local function stat_fields(pid)
  local stat = H.read_file("/proc/" .. pid .. "/stat")
  if not stat then return nil end
  local f = {}
  for x in stat:match("%) (.*)$"):gmatch("%S+") do f[#f + 1] = x end
  return f
end

local function cpu_seconds(pid)
  local f = stat_fields(pid)
  return (tonumber(f[12]) + tonumber(f[13])) / CLK_TCK
end

-- Resident set now and at its peak, in bytes.
local function memory(pid)
  local status = H.read_file("/proc/" .. pid .. "/status")
  return tonumber(status:match("VmRSS:%s+(%d+)")) * 1024, tonumber(status:match("VmHWM:%s+(%d+)")) * 1024
end

local function percentile(xs, p)
  local s = {}
  for i, x in ipairs(xs) do s[i] = x end
  table.sort(s)
  return s[math.max(1, math.ceil(#s * p))]
end

-- ---------------------------------------------------------------- the server

local S -- the server, started by main()

local SETTINGS = { "server_version", "fsync", "synchronous_commit", "full_page_writes", "shared_buffers",
  "max_connections", "max_wal_size", "checkpoint_timeout", "default_transaction_isolation", "jit" }

local function settings()
  local c = core.connect(S:dsn())
  local out = {}
  for _, name in ipairs(SETTINGS) do
    local r = c:one("SELECT setting, coalesce(unit, '') AS unit FROM pg_settings WHERE name = $1", name)
    local v = r.setting
    if r.unit == "8kB" then v = string.format("%.0f MB", tonumber(v) * 8 / 1024)
    elseif r.unit ~= "" then v = v .. " " .. r.unit end
    out[#out + 1] = { name, v }
  end
  c:close()
  return out
end

-- CPU seconds the database server has spent so far: its postmaster's own
-- and its reaped children's, and every live child's (backends,
-- autovacuum, the writers). A contender's database CPU is the difference
-- across its run; bench/peer/run.js counts the same way.
local function server_cpu()
  local pm = tonumber((H.read_file(S.data .. "/postmaster.pid") or ""):match("^(%d+)"))
  local total = 0
  local ls = io.popen("ls /proc")
  for name in ls:lines() do
    local f = name:match("^%d+$") and stat_fields(name)
    if f and tonumber(name) == pm then
      total = total + tonumber(f[12]) + tonumber(f[13]) + tonumber(f[14]) + tonumber(f[15])
    elseif f and tonumber(f[2]) == pm then
      total = total + tonumber(f[12]) + tonumber(f[13])
    end
  end
  ls:close()
  return total / CLK_TCK
end

-- A fresh database with the schema: dsn, admin connection.
local function fresh_db()
  local dsn = S:create_db()
  local code, _, err = H.run({ H.bin, "migrate" }, { env = { BMDB_DSN = dsn } })
  assert(code == 0, "migrate failed: " .. err)
  return dsn, core.connect(dsn)
end

local function script(text)
  local path = H.tmpdir("bench") .. "/bench.lua"
  H.write_file(path, text)
  return path
end

local function start_hosts(dsn, path, n, args)
  local hosts = {}
  for i = 1, n do
    local argv = { H.bin }
    for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
    argv[#argv + 1] = path
    hosts[i] = H.spawn { argv = argv, env = { BMDB_DSN = dsn } }
  end
  for _, h in ipairs(hosts) do h:await("stderr", "workers started", 30) end
  return hosts
end

-- What the hosts logged at warn or error, over the whole run: a lost
-- session or failed claims make a figure suspect, so they are reported.
local warnings = {}

-- Stops the hosts; their claims, retries, batched finishes and batches,
-- summed.
local function stop_hosts(hosts, what)
  local claims, retries, batched, batches = 0, 0, 0, 0
  for _, h in ipairs(hosts) do
    h:kill("TERM")
    h:wait(60)
    local log = h:stderr()
    local cl, re = log:match('msg="workers stopped" claims=(%d+) retries=(%d+)')
    assert(cl, "a host did not log its claims and retries:\n" .. log:sub(-2000))
    claims, retries = claims + tonumber(cl), retries + tonumber(re)
    local bf, bb = log:match('msg="workers stopped" .-batched=(%d+) batches=(%d+)')
    batched, batches = batched + tonumber(bf or 0), batches + tonumber(bb or 0)
    for line in log:gmatch("[^\n]+") do
      local msg = line:match("level=warn (msg=%S+)") or line:match("level=error (msg=%S+)")
      if msg then
        local key = what .. ": " .. msg
        if not warnings[key] then warnings[#warnings + 1] = key end
        warnings[key] = (warnings[key] or 0) + 1
      end
    end
  end
  return claims, retries, batched, batches
end

-- ---------------------------------------------------------------- reload

local reload_template = [[
local bmdb = require "bmdb"
local VERSION = %d
return {
  bmdb.worker {
    process = "Bench", poll = %g,
    select = function(tx, limit)
      return tx:query([=[SELECT w.machine_id FROM wanted w
        WHERE NOT EXISTS (SELECT 1 FROM ran r WHERE r.machine_id = w.machine_id)
          AND NOT EXISTS (SELECT 1 FROM work_blocked b WHERE b.machine_id = w.machine_id AND b.process = 'Bench')
        LIMIT $1]=], limit)
    end,
    run = function(w)
      w:finish(function(tx) tx:exec("INSERT INTO ran VALUES ($1, $2)", w.machine, VERSION) end)
    end,
  },
}
]]

local function want(c)
  local m = c:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
  c:exec("INSERT INTO wanted VALUES ($1)", m)
  c:exec("SELECT pg_notify('bmdb_wake', 'Bench')")
  return m
end

local function bench_reload()
  local dsn, c = fresh_db()
  c:exec("CREATE TABLE wanted (machine_id UUID PRIMARY KEY)")
  c:exec("CREATE TABLE ran (machine_id UUID PRIMARY KEY, version INT8 NOT NULL)")
  local path = script(reload_template:format(1, 1))
  local p = start_hosts(dsn, path, 1, { "--watch" })[1]
  local logged, active = {}, {}
  for v = 2, SAVES + 1 do
    H.write_file(path .. ".tmp", reload_template:format(v, 1))
    local t0 = H.now()
    os.rename(path .. ".tmp", path)
    H.wait_until(function() return p:stderr():find("msg=reloaded generation=" .. v .. " ", 1, true) end, 10, "reload " .. v, 0.002)
    logged[#logged + 1] = H.now() - t0
    local m = want(c) -- new code active: an item runs on version v
    H.wait_until(function()
      local r = c:one("SELECT version FROM ran WHERE machine_id = $1", m)
      return r and r.version == v
    end, 10, "an item on version " .. v, 0.002)
    active[#active + 1] = H.now() - t0
  end
  stop_hosts({ p }, "reload")
  c:close()
  return { logged_median = percentile(logged, 0.5), logged_p90 = percentile(logged, 0.9),
           active_median = percentile(active, 0.5), active_p90 = percentile(active, 0.9) }
end

-- ---------------------------------------------------------------- wake

-- The body notes CLOCK_MONOTONIC, the clock H.now() reads, as it starts.
local wake_script = [[
local bmdb = require "bmdb"
local ffi = require "ffi"
pcall(ffi.cdef, "struct bench_ts { long s; long ns; }; int clock_gettime(int, struct bench_ts *);")
local ts = ffi.new("struct bench_ts")
return {
  bmdb.worker {
    process = "Bench", poll = 30,
    select = function(tx, limit)
      return tx:query([=[SELECT w.machine_id FROM wanted w
        WHERE NOT EXISTS (SELECT 1 FROM ran r WHERE r.machine_id = w.machine_id)
          AND NOT EXISTS (SELECT 1 FROM work_blocked b WHERE b.machine_id = w.machine_id AND b.process = 'Bench')
        LIMIT $1]=], limit)
    end,
    run = function(w)
      ffi.C.clock_gettime(1, ts)
      local at = tonumber(ts.s) + tonumber(ts.ns) / 1e9
      w:finish(function(tx) tx:exec("INSERT INTO ran VALUES ($1, $2)", w.machine, at) end)
    end,
  },
}
]]

local function bench_wake()
  local dsn, c = fresh_db()
  c:exec("CREATE TABLE wanted (machine_id UUID PRIMARY KEY)")
  c:exec("CREATE TABLE ran (machine_id UUID PRIMARY KEY, at FLOAT8 NOT NULL)")
  local p = start_hosts(dsn, script(wake_script), 1)[1]
  local lat = {}
  for _ = 1, WAKES do
    local m = c:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
    -- Let the slot finish its last select and go back to sleep, so each
    -- sample is a wake from idle, not a slot that happened to be looking.
    H.sleep(0.01)
    local t0 = H.now()
    c:exec("WITH e AS (INSERT INTO wanted VALUES ($1)) SELECT pg_notify('bmdb_wake', 'Bench')", m)
    local r = H.wait_until(function() return c:one("SELECT at FROM ran WHERE machine_id = $1", m) end,
      10, "the pick-up", 0.002)
    lat[#lat + 1] = r.at - t0
  end
  stop_hosts({ p }, "wake")
  c:close()
  return { median = percentile(lat, 0.5), p90 = percentile(lat, 0.9), p99 = percentile(lat, 0.99), n = #lat }
end

-- ---------------------------------------------------------------- throughput

local noop_script = [[
local bmdb = require "bmdb"
return {
  bmdb.worker {
    process = "Bench", concurrency = %d,%s
    select = function(tx, limit)
      return tx:query([=[SELECT t.machine_id FROM todo t
        WHERE NOT EXISTS (SELECT 1 FROM work_blocked b WHERE b.machine_id = t.machine_id AND b.process = 'Bench')
        LIMIT $1]=], limit)
    end,
    run = function(w)
      w:finish(function(tx) tx:%s("DELETE FROM todo WHERE machine_id = $1", w.machine) end)
    end,
  },
}
]]

-- The no-op worker of `slots` slots; verb "defer" or "exec" (below);
-- ahead: the worker's `ahead`, or nil to leave it out, so the worker
-- claims ahead while its items are short, as by default.
local function noop(slots, verb, ahead)
  return noop_script:format(slots, ahead and (" ahead = " .. ahead .. ",") or "", verb)
end

-- ITEMS machines made eligible in one statement while the hosts idle; the
-- clock runs from its return until the todo table is empty.
-- The commit function defers its DELETE (tx:defer), as docs/workers.md advises;
-- with verb "exec" it waits for the DELETE's answer instead. ahead: as
-- for noop().
local function bench_host(hosts_n, slots, what, verb, ahead)
  local dsn, c = fresh_db()
  c:exec("CREATE TABLE todo (machine_id UUID PRIMARY KEY)")
  c:exec("INSERT INTO machines (machine_id) SELECT gen_random_uuid() FROM generate_series(1, $1)", ITEMS)
  local hosts = start_hosts(dsn, script(noop(slots, verb or "defer", ahead)), hosts_n)
  local cpu0 = 0
  for _, h in ipairs(hosts) do cpu0 = cpu0 + cpu_seconds(h.pid) end
  local db0 = server_cpu()
  c:exec("WITH e AS (INSERT INTO todo SELECT machine_id FROM machines) SELECT pg_notify('bmdb_wake', 'Bench')")
  local t0 = H.now()
  H.wait_until(function() return c:one("SELECT NOT EXISTS (SELECT 1 FROM todo) AS done").done end,
    DRAIN_TIMEOUT, ITEMS .. " items", 0.01)
  local seconds = H.now() - t0
  local db_cpu = server_cpu() - db0
  local cpu, peak = 0, 0
  for _, h in ipairs(hosts) do
    cpu = cpu + cpu_seconds(h.pid)
    peak = math.max(peak, select(2, memory(h.pid)))
  end
  local claims, retries, batched, batches = stop_hosts(hosts, what)
  c:close()
  return { rate = ITEMS / seconds, retries = retries / math.max(claims, 1),
           batched = batched / ITEMS, per_batch = batched / math.max(batches, 1),
           cpu = (cpu - cpu0) / ITEMS, db_cpu = db_cpu / ITEMS, peak = peak }
end

local function bench_peer(concurrency, mode)
  local db = S:create_db():match("dbname=(%S+)")
  local code, out, err = H.run({ "node", H.root .. "/bench/peer/run.js", tostring(ITEMS), tostring(concurrency), mode },
    { env = { PGHOST = S.dir, PGPORT = "5432", PGUSER = "bmdb", PGDATABASE = db, TIMEOUT = DRAIN_TIMEOUT,
              BENCH_PGPID = H.read_file(S.data .. "/postmaster.pid"):match("^(%d+)"),
              BENCH_CLK_TCK = tostring(CLK_TCK) },
      timeout = DRAIN_TIMEOUT + 60 })
  local jobs, seconds, cpu, rss, db_cpu =
    out:match("result jobs=(%d+) seconds=([%d.]+) cpu=([%d.]+) rss=(%d+) dbcpu=([%d.]+)")
  assert(code == 0 and jobs, "the peer failed (exit " .. code .. "):\n" .. err:sub(-2000))
  return { rate = tonumber(jobs) / tonumber(seconds), cpu = tonumber(cpu) / tonumber(jobs), peak = tonumber(rss),
           db_cpu = tonumber(db_cpu) / tonumber(jobs) }
end

local pgbench_db

local function bench_pgbench(clients)
  local conn = { "-h", S.dir, "-p", "5432", "-U", "bmdb" }
  local PGBENCH = S.bindir .. "/pgbench"
  if not pgbench_db then
    pgbench_db = S:create_db():match("dbname=(%S+)")
    local argv = { PGBENCH, "-i", "-q", "-s", "1" }
    for _, a in ipairs(conn) do argv[#argv + 1] = a end
    argv[#argv + 1] = pgbench_db
    local code, out, err = H.run(argv, { timeout = 120 })
    assert(code == 0, "pgbench -i failed: " .. err .. out)
  end
  local argv = { PGBENCH, "-N", "-c", tostring(clients), "-j", tostring(math.min(clients, NPROC)),
                 "-T", tostring(PGBENCH_SECONDS) }
  for _, a in ipairs(conn) do argv[#argv + 1] = a end
  argv[#argv + 1] = pgbench_db
  local db0 = server_cpu()
  local code, out, err = H.run(argv, { timeout = PGBENCH_SECONDS + 60 })
  local tps = out:match("tps = ([%d.]+) %(without initial connection time%)")
  local n = out:match("number of transactions actually processed: (%d+)")
  assert(code == 0 and tps and n, "pgbench failed: " .. err .. out)
  H.sleep(0.2) -- for the server to reap pgbench's backends, whose CPU it then counts
  return { rate = tonumber(tps), db_cpu = (server_cpu() - db0) / tonumber(n) }
end

-- ---------------------------------------------------------------- scale

local scale_script = [[
local bmdb = require "bmdb"
return {
  bmdb.worker {
    process = "Bench",
    select = function(tx, limit)
      return tx:query([=[SELECT m.machine_id FROM machines m
        WHERE NOT EXISTS (SELECT 1 FROM done d WHERE d.machine_id = m.machine_id)
          AND NOT EXISTS (SELECT 1 FROM work_blocked b
                          WHERE b.machine_id = m.machine_id AND b.process = 'Bench')
        LIMIT $1]=], limit)
    end,
    run = function(w)
      w:finish(function(tx) tx:exec("INSERT INTO done VALUES ($1)", w.machine) end)
    end,
  },
}
]]

-- A database with `machines` machines, filled once for every round.
local function scale_db(machines)
  local dsn, c = fresh_db()
  c:exec("CREATE TABLE done (machine_id UUID PRIMARY KEY)")
  c:exec("INSERT INTO machines (machine_id) SELECT gen_random_uuid() FROM generate_series(1, $1)", machines)
  -- A fleet's table is not freshly bulk-loaded: without this, the timed
  -- items would share the machine with autovacuum's first pass over a
  -- million new rows and pay for setting their hint bits.
  c:exec("VACUUM (ANALYZE) machines")
  return { dsn = dsn, c = c, machines = machines }
end

-- Seconds per item of one slot, in the steady state, over one round:
-- from the moment SCALE_WARM items are done until SCALE_WARM +
-- SCALE_TIMED are, every machine eligible again at its start.
local function scale_round(db)
  local c = db.c
  c:exec("TRUNCATE done")
  local hosts = start_hosts(db.dsn, script(scale_script), 1)
  local function count() return c:one("SELECT count(*) AS n FROM done").n end
  local t0, n0, t1, n1
  H.wait_until(function()
    local n = count()
    if n >= SCALE_WARM then t0, n0 = H.now(), n end
    return t0
  end, DRAIN_TIMEOUT, SCALE_WARM .. " items", 0.005)
  H.wait_until(function()
    local n = count()
    if n >= SCALE_WARM + SCALE_TIMED then t1, n1 = H.now(), n end
    return t1
  end, DRAIN_TIMEOUT, SCALE_TIMED .. " more items", 0.005)
  stop_hosts(hosts, "scale " .. db.machines)
  return (t1 - t0) / (n1 - n0)
end

-- The per-item cost at both sizes: SCALE_ROUNDS rounds each, the two
-- sizes taking turns (a change in the machine's load then falls on both),
-- and each size's median. One round is about a second, too short to
-- trust alone: single rounds put the ratio anywhere from 1.0 to 2.2.
local function bench_scale()
  local small, big = scale_db(SMALL), scale_db(BIG)
  local s, b = {}, {}
  for i = 1, SCALE_ROUNDS do
    s[i] = scale_round(small)
    b[i] = scale_round(big)
  end
  small.c:close()
  big.c:close()
  return percentile(s, 0.5), percentile(b, 0.5)
end

-- ---------------------------------------------------------------- idle

-- pg_stat_statements is loaded by a restart, after every other figure, so
-- none of them paid for its bookkeeping.
local function bench_idle()
  local admin = core.connect(S:dsn())
  admin:exec("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
  admin:close()
  S:restart()
  local dsn, c = fresh_db()
  c:exec("CREATE EXTENSION pg_stat_statements")
  c:exec("CREATE TABLE todo (machine_id UUID PRIMARY KEY)")
  local hosts = start_hosts(dsn, script(noop(16, "defer")), 1)
  H.sleep(2) -- past the first selects of a starting host
  local mine = "query NOT LIKE '%pg_stat_statements%'"
  c:exec("SELECT pg_stat_statements_reset()")
  local t0 = H.now()
  H.sleep(IDLE_SECONDS)
  local rows = c:query("SELECT query, calls FROM pg_stat_statements WHERE dbid = "
    .. "(SELECT oid FROM pg_database WHERE datname = current_database()) AND " .. mine .. " ORDER BY calls DESC")
  local seconds = H.now() - t0
  local rss = memory(hosts[1].pid)
  stop_hosts(hosts, "idle")
  c:close()
  local total, begins, top = 0, 0, {}
  for i, r in ipairs(rows) do
    total = total + r.calls
    if r.query:match("^%s*BEGIN") then begins = begins + r.calls end
    if i <= 5 then top[#top + 1] = { query = r.query:gsub("%s+", " "), rate = r.calls / seconds } end
  end
  return { rate = total / seconds, tx_rate = begins / seconds, top = top, rss = rss }
end

-- ---------------------------------------------------------------- report

local function f(fmt, x)
  if x == nil then return "—" end
  return string.format(fmt, x)
end

local function ratio(a, b)
  if not a or not b or b == 0 then return "—" end
  return string.format("%.2f", a / b)
end

local function mb(bytes) return f("%.1f MB", bytes and bytes / 1024 / 1024) end

local function report(r)
  local L = {}
  local function add(s) L[#L + 1] = s end
  local cols = { "c=1", "c=4", "c=16", "3 hosts × 4" }
  local function row(label, fn)
    local cells = { label }
    for i = 1, 4 do cells[#cells + 1] = fn(i) end
    add("| " .. table.concat(cells, " | ") .. " |")
  end
  local host, def, bat, pgb = r.host, r.peer_default, r.peer_batched, r.pgbench
  add("| per second (items, jobs, transactions) | " .. table.concat(cols, " | ") .. " |")
  add("|---|---:|---:|---:|---:|")
  row("bmdb-host items/s", function(i) return f("%.0f", host[i] and host[i].rate) end)
  row("bmdb-host items/s, commit function with tx:exec", function(i)
    return f("%.0f", r.host_exec[i] and r.host_exec[i].rate)
  end)
  row("bmdb-host items/s, not claiming ahead (`ahead = 0`)", function(i)
    return f("%.0f", r.host_no_ahead[i] and r.host_no_ahead[i].rate)
  end)
  row("graphile-worker " .. r.peer_version .. ", defaults", function(i) return f("%.0f", def[i] and def[i].rate) end)
  row("graphile-worker " .. r.peer_version .. ", batched", function(i) return f("%.0f", bat[i] and bat[i].rate) end)
  row("pgbench -N tps", function(i) return f("%.0f", pgb[i] and pgb[i].rate) end)
  row("bmdb-host ÷ peer defaults (target ≥ 1.5)", function(i) return ratio(host[i] and host[i].rate, def[i] and def[i].rate) end)
  row("bmdb-host ÷ peer batched (target ≥ 1.0 at c=4, 16)", function(i) return ratio(host[i] and host[i].rate, bat[i] and bat[i].rate) end)
  row("bmdb-host not claiming ahead ÷ peer defaults", function(i)
    return ratio(r.host_no_ahead[i] and r.host_no_ahead[i].rate, def[i] and def[i].rate)
  end)
  row("bmdb-host ÷ pgbench -N (target ≥ 1.0 at c=4)", function(i) return ratio(host[i] and host[i].rate, pgb[i] and pgb[i].rate) end)
  row("bmdb-host retries per claim (target ≤ 0.05 at c=16)", function(i) return f("%.3f", host[i] and host[i].retries) end)
  row("bmdb-host finishes batched (share / per batch)", function(i)
    return host[i] and string.format("%.2f / %.1f", host[i].batched, host[i].per_batch) or "—"
  end)
  row("database CPU per item, job or transaction: bmdb-host / peer defaults / peer batched / pgbench -N", function(i)
    local cells = {}
    for k, t in ipairs({ host, def, bat, pgb }) do
      if t[i] and t[i].db_cpu then cells[#cells + 1] = string.format("%.3f", t[i].db_cpu * 1000)
      elseif k == 1 or t[i] then cells[#cells + 1] = "—" end
    end
    return table.concat(cells, " / ") .. " ms"
  end)
  row("bmdb-host CPU per item", function(i) return f("%.3f ms", host[i] and host[i].cpu * 1000) end)
  row("graphile-worker CPU per job, defaults", function(i) return f("%.3f ms", def[i] and def[i].cpu * 1000) end)
  row("graphile-worker CPU per job, batched", function(i) return f("%.3f ms", bat[i] and bat[i].cpu * 1000) end)
  row("peak RSS: bmdb-host / graphile-worker defaults", function(i)
    if not host[i] then return "—" end
    return mb(host[i].peak) .. (def[i] and " / " .. mb(def[i].peak) or "")
  end)
  add("")
  add("| figure | value | target |")
  add("|---|---:|---|")
  add(string.format("| wake, eligible → body running: median / p90 / p99 (%d wakes) | %.1f / %.1f / %.1f ms | median < 5 ms, p99 < 50 ms |",
    r.wake.n, r.wake.median * 1000, r.wake.p90 * 1000, r.wake.p99 * 1000))
  add(string.format("| per-item cost, one slot, %s machines | %.3f ms | |", "1,000", r.scale_small * 1000))
  add(string.format("| per-item cost, one slot, %s machines | %.3f ms | |", r.big_label, r.scale_big * 1000))
  add(string.format("| %s ÷ 1,000 | %.2f | ≤ 1.5 |", r.big_label, r.scale_big / r.scale_small))
  add(string.format("| idle host, 16 slots (poll 1 s): statements / transactions per second it causes | %.1f / %.1f | |",
    r.idle.rate, r.idle.tx_rate))
  add(string.format("| RSS, 16 slots: idle / peak after the c=16 run | %s / %s | < 30 MB |", mb(r.idle.rss), mb(host[3] and host[3].peak)))
  add(string.format("| bmdb-host CPU per item at c=16 | %s | |", f("%.3f ms", host[3] and host[3].cpu * 1000)))
  add(string.format("| reload, save → logged: median / p90 (%d saves) | %.1f / %.1f ms | |",
    SAVES, r.reload.logged_median * 1000, r.reload.logged_p90 * 1000))
  add(string.format("| reload, save → new code ran: median / p90 | %.1f / %.1f ms | median < 200 ms |",
    r.reload.active_median * 1000, r.reload.active_p90 * 1000))
  return table.concat(L, "\n")
end

local function host_warnings()
  if #warnings == 0 then return "The hosts logged no warnings or errors." end
  local L = { "The hosts logged warnings or errors (the figures of those parts are suspect):", "" }
  for _, k in ipairs(warnings) do L[#L + 1] = string.format("    %dx %s", warnings[k], k) end
  return table.concat(L, "\n")
end

local function idle_statements(idle)
  local L = { "Statements of the idle host, per second (the five most frequent):", "" }
  for _, t in ipairs(idle.top) do
    local q = t.query
    if #q > 100 then q = q:sub(1, 97) .. "..." end
    L[#L + 1] = string.format("    %6.1f/s  %s", t.rate, q)
  end
  return table.concat(L, "\n")
end

local HOW = [[
How it was measured (bench/run.lua): one PostgreSQL, started by the harness
(initdb in a temporary directory, Unix socket only, the settings above),
serves every contender in turn, each in a fresh database; at each
concurrency bmdb-host, graphile-worker (defaults, then batched) and
pgbench run one after another. bmdb-host: %d machines are made eligible in
one statement (`INSERT INTO todo ... ; pg_notify`) while the hosts idle;
the body only calls `w:finish` with one `DELETE FROM todo`, which its
commit function defers (`tx:defer`; in the row "with tx:exec" it waits
for the DELETE's answer instead). The worker leaves `ahead` out, so it
claims ahead while its items are short, as by default (docs/workers.md); the row
"not claiming ahead" has `ahead = 0`. The clock runs
from that statement's return until `todo` is empty (polled every 10 ms).
Retries per claim are the hosts' own `claims` and `retries` (logged when
they stop); CPU is the hosts' utime + stime (/proc/PID/stat) over the
drain; peak RSS is VmHWM. Database CPU is the server's, over the same
span (every contender's the same way): the utime + stime of the
postmaster and its children, live ones and reaped ones (cutime,
cstime), so autovacuum and the writers count too, and for bmdb-host the
harness's own polling, a few µs per item. graphile-worker (bench/peer/run.js): the runner
starts idle, %d no-op jobs are added with one `addJobs`, the clock runs
from its return until every job succeeded and its row is gone; defaults
except the pool (10 or concurrency + 2, as its documentation asks),
batched adds `localQueue: { size: 500 }` and `completeJobBatchDelay: 0`.
Both log one line per item or job, at their default log level. pgbench:
`pgbench -N -c C -j min(C, nproc) -T %d` on scale 1 (its database CPU over
the whole run, connections included, per transaction). Wake: an idle host
(poll 30 s) and one statement that makes a machine eligible and NOTIFYs;
the body reads CLOCK_MONOTONIC as it starts. Scale: one slot, select
`machines m WHERE NOT EXISTS (done) AND NOT EXISTS (work_blocked) LIMIT $1`
(no ORDER BY; `machines` vacuumed and analyzed after it was filled, as a
fleet's table would be), finish inserts into `done`; timed from the %dth to the
%dth item, in %d rounds per size that alternate between the sizes (`done`
emptied before each), the median of each size's rounds. Idle: 16 slots (poll 1 s) with nothing to do, %d s, the sum of
pg_stat_statements calls in their database (the library is loaded by a
restart for this last part only). Reload: %d saves under --watch.]]

local function write_benchmarks(r, text)
  if OUT == "-" then return end
  local L = {}
  local function add(s) L[#L + 1] = s end
  add("<!-- bench:begin (written by `make bench`; edit outside the markers) -->")
  add("## Latest run")
  add("")
  add(string.format("%s, commit %s.", r.date, r.commit))
  add("")
  add(string.format("Machine: %s, %d CPUs (nproc), %s of memory, Linux %s; load average %s before the run, %s after.",
    r.machine.cpu, r.machine.nproc, r.machine.memory, r.machine.kernel, r.load_before, r.load_after))
  add("")
  local s = {}
  for _, kv in ipairs(r.settings) do s[#s + 1] = kv[1] .. " = " .. kv[2] end
  add("PostgreSQL settings, for every contender: " .. table.concat(s, ", ") .. ".")
  add("")
  add(text)
  add("")
  if NOTE and NOTE ~= "" then
    add("Note: " .. NOTE)
    add("")
  end
  add(host_warnings())
  add("")
  add(idle_statements(r.idle))
  add("")
  add(string.format(HOW, ITEMS, ITEMS, PGBENCH_SECONDS, SCALE_WARM, SCALE_WARM + SCALE_TIMED, SCALE_ROUNDS,
                    IDLE_SECONDS, SAVES))
  add("<!-- bench:end -->")
  local generated = table.concat(L, "\n")
  local old = H.read_file(OUT)
  local new
  if old and old:find("<!-- bench:begin", 1, true) and old:find("<!-- bench:end -->", 1, true) then
    local a = old:find("<!-- bench:begin", 1, true)
    local _, b = old:find("<!-- bench:end -->", 1, true)
    new = old:sub(1, a - 1) .. generated .. old:sub(b + 1)
  elseif old then
    new = old:gsub("%s*$", "\n\n") .. generated .. "\n"
  else
    new = "# Benchmarks\n\n`make bench` measures bmdb-host against a peer and against PostgreSQL's own\n"
      .. "ceiling, and rewrites the section below. Nothing is asserted on timing.\n\n" .. generated .. "\n"
  end
  H.write_file(OUT, new)
  print("written to " .. OUT)
end

local function peer_version()
  local pkg = H.read_file(H.root .. "/bench/peer/node_modules/graphile-worker/package.json") or ""
  return pkg:match('"version"%s*:%s*"([^"]+)"') or "?"
end

local function main()
  S = H.postgres()
  local r = { host = {}, host_exec = {}, host_no_ahead = {}, peer_default = {}, peer_batched = {}, pgbench = {} }
  r.date = os.date("!%Y-%m-%d %H:%M UTC")
  r.commit = sh("git rev-parse --short HEAD") .. (sh("git status --porcelain --untracked-files=no") ~= "" and " (with local changes)" or "")
  r.machine = machine()
  r.load_before = loadavg()
  r.settings = settings()
  r.peer_version = peer_version()
  r.big_label = BIG == 1000000 and "1,000,000" or tostring(BIG)
  print(string.format("machine: %s, %d CPUs, %s; load %s", r.machine.cpu, r.machine.nproc, r.machine.memory, r.load_before))
  for _, kv in ipairs(r.settings) do print(string.format("  %-30s %s", kv[1], kv[2])) end
  local function step(what, fn)
    io.write(what, " ... ")
    io.flush()
    local t = H.now()
    local v = fn()
    print(string.format("%.1f s", H.now() - t))
    return v
  end
  r.reload = step("reload", bench_reload)
  r.wake = step("wake", bench_wake)
  for i, c in ipairs(CONCURRENCY) do
    r.host[i] = step("bmdb-host c=" .. c, function() return bench_host(1, c, "c=" .. c) end)
    r.host_exec[i] = step("bmdb-host, tx:exec, c=" .. c, function() return bench_host(1, c, "c=" .. c .. " exec", "exec") end)
    r.host_no_ahead[i] = step("bmdb-host, ahead = 0, c=" .. c, function()
      return bench_host(1, c, "c=" .. c .. " ahead = 0", "defer", 0)
    end)
    r.peer_default[i] = step("graphile-worker defaults c=" .. c, function() return bench_peer(c, "default") end)
    r.peer_batched[i] = step("graphile-worker batched c=" .. c, function() return bench_peer(c, "batched") end)
    r.pgbench[i] = step("pgbench -N c=" .. c, function() return bench_pgbench(c) end)
  end
  r.host[4] = step("bmdb-host 3 hosts x 4", function() return bench_host(3, 4, "3 hosts x 4") end)
  r.scale = step("scale 1,000 and " .. r.big_label .. " machines", function() return { bench_scale() } end)
  r.scale_small, r.scale_big = r.scale[1], r.scale[2]
  r.idle = step("idle, 16 slots", bench_idle)
  r.load_after = loadavg()
  local text = report(r)
  print("")
  print(text)
  print("")
  print(host_warnings())
  print("")
  print(idle_statements(r.idle))
  write_benchmarks(r, text)
end

-- Loaded with the argument "scripts" (spec/bench_spec.lua), it only hands
-- back the worker scripts it would run, so a spec can check them.
if ... == "scripts" then
  return { reload = reload_template:format(1, 1), wake = wake_script,
           noop = noop(16, "defer"), noop_exec = noop(16, "exec"), noop_no_ahead = noop(1, "defer", 0),
           scale = scale_script }
end

local ok, err = xpcall(main, debug.traceback)
H.cleanup()
if not ok then
  io.stderr:write(tostring(err), "\n")
  os.exit(1)
end
