-- bench/run.lua -- measured figures, never asserted: `make bench`.
--
-- 1. Reload latency: a worker host runs under --watch; we save a new
--    version of its script (write a temp file, rename it over) and time
--    (a) until the host logs the reload and (b) until an item runs on the
--    new code. Target: median under 200 ms on an idle host.
-- 2. Wake-up latency: an idle host with a 30 s poll interval; we make a
--    machine eligible and NOTIFY, and time until a slot runs it.
--
-- 3. Claim contention: 3 hosts x 4 slots drain 300 eligible machines whose
--    bodies do nothing; items per second and serialization retries per
--    claim show what SERIALIZABLE claims cost when every slot is hungry.
--
-- Figures are reported with their ratio to the target or to the poll
-- interval they replace, measured in this one run on this machine. The
-- observer polls every 2 ms, so figures carry up to 2 ms of that.
package.path = "spec/?.lua;lua/?.lua;" .. package.path
package.cpath = "build/?.so;" .. package.cpath
local H = require "support.helpers"
local core = require "bmdb.core"

local SAVES = tonumber(os.getenv("SAVES") or "15")

local template = [[
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

local function percentile(xs, p)
  table.sort(xs)
  return xs[math.max(1, math.ceil(#xs * p))]
end

local function setup_db()
  local dsn = H.postgres():create_db()
  assert(H.run({ H.bin, "migrate" }, { env = { BMDB_DSN = dsn } }) == 0, "migrate failed")
  local c = core.connect(dsn)
  c:exec("CREATE TABLE wanted (machine_id UUID PRIMARY KEY)")
  c:exec("CREATE TABLE ran (machine_id UUID PRIMARY KEY, version INT8 NOT NULL)")
  return dsn, c
end

local function want(c)
  local m = c:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
  c:exec("INSERT INTO wanted VALUES ($1)", m)
  c:exec("SELECT pg_notify('bmdb_wake', 'Bench')")
  return m
end

local function start(dsn, path)
  local p = H.spawn { argv = { H.bin, "--watch", path }, env = { BMDB_DSN = dsn } }
  H.wait_until(function() return p:stderr():match("workers started") end, 30, "the host")
  return p
end

local function bench_reload()
  local dsn, c = setup_db()
  local dir = H.tmpdir("bench")
  local path = dir .. "/bench.lua"
  H.write_file(path, template:format(1, 1))
  local p = start(dsn, path)
  local logged, active = {}, {}
  for v = 2, SAVES + 1 do
    H.write_file(path .. ".tmp", template:format(v, 1))
    local t0 = H.now()
    os.rename(path .. ".tmp", path)
    H.wait_until(function() return p:stderr():find("msg=reloaded generation=" .. v .. " ", 1, true) end, 10, "reload " .. v, 0.002)
    logged[#logged + 1] = H.now() - t0
    -- new code active: an item runs on version v
    local m = want(c)
    H.wait_until(function()
      local r = c:one("SELECT version FROM ran WHERE machine_id = $1", m)
      return r and r.version == v
    end, 10, "an item on version " .. v, 0.002)
    active[#active + 1] = H.now() - t0
  end
  p:kill("TERM")
  p:wait(30)
  c:close()
  local med = percentile(active, 0.5)
  print(string.format("reload, save -> logged:      median %6.1f ms  p90 %6.1f ms  (%d saves)",
    percentile(logged, 0.5) * 1000, percentile(logged, 0.9) * 1000, SAVES))
  print(string.format("reload, save -> new code ran: median %6.1f ms  p90 %6.1f ms  = %.2f x the 200 ms target",
    med * 1000, percentile(active, 0.9) * 1000, med / 0.2))
end

local function bench_wake()
  local dsn, c = setup_db()
  local dir = H.tmpdir("bench")
  local path = dir .. "/bench.lua"
  local poll = 30
  H.write_file(path, template:format(1, poll))
  local p = start(dsn, path)
  local lat = {}
  for _ = 1, SAVES do
    local t0 = H.now()
    local m = want(c)
    H.wait_until(function() return c:one("SELECT 1 AS x FROM ran WHERE machine_id = $1", m) end, 10, "the pick-up", 0.002)
    lat[#lat + 1] = H.now() - t0
  end
  p:kill("TERM")
  p:wait(30)
  c:close()
  local med = percentile(lat, 0.5)
  print(string.format("wake-up, NOTIFY -> item ran:  median %6.1f ms  p90 %6.1f ms  = 1/%.0f of the %d s poll interval",
    med * 1000, percentile(lat, 0.9) * 1000, poll / med, poll))
end

local function bench_contention()
  local dsn, c = setup_db()
  local dir = H.tmpdir("bench")
  local path = dir .. "/bench.lua"
  H.write_file(path, (template:format(1, 1):gsub('process = "Bench",', 'process = "Bench", concurrency = 4,')))
  local n = 300
  c:exec("INSERT INTO machines SELECT gen_random_uuid() FROM generate_series(1, $1)", n)
  local hosts = {}
  for i = 1, 3 do hosts[i] = H.spawn { argv = { H.bin, path }, env = { BMDB_DSN = dsn } } end
  for _, h in ipairs(hosts) do H.wait_until(function() return h:stderr():match("workers started") end, 30, "a host") end
  local t0 = H.now()
  c:exec("INSERT INTO wanted SELECT machine_id FROM machines")
  c:exec("SELECT pg_notify('bmdb_wake', 'Bench')")
  H.wait_until(function() return c:one("SELECT count(*) AS n FROM ran").n == n end, 120, "every machine", 0.005)
  local took = H.now() - t0
  local claims, retries = 0, 0
  for _, h in ipairs(hosts) do
    h:kill("TERM")
    h:wait(30)
    local cl, re = h:stderr():match('msg="workers stopped" claims=(%d+) retries=(%d+)')
    claims, retries = claims + tonumber(cl), retries + tonumber(re)
  end
  c:close()
  print(string.format("contention, 3 hosts x 4 slots: %d items in %.2f s = %.0f items/s; %.2f retries per claim",
    n, took, n / took, retries / math.max(claims, 1)))
end

local ok, err = pcall(function()
  bench_reload()
  bench_wake()
  bench_contention()
end)
H.cleanup()
if not ok then
  io.stderr:write(tostring(err), "\n")
  os.exit(1)
end
