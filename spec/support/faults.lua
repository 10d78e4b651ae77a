-- support/faults.lua -- what the fault specs (spec/fault/) share: a
-- database with the audit tables, a worker script whose bodies record
-- their own intervals, hosts started with a name the server can see, an
-- admin connection that survives server restarts, the audit itself and the
-- figures each spec appends for `make check-all`'s table.
--
-- The audit trusts two independent records: work_history, written by the
-- host, and `intervals`, written by the bodies (each body reads
-- clock_timestamp() when it starts and writes its row with the finish, so
-- a row exists only for an item whose finish committed).
local H = require "support.helpers"
local core = require "bmdb.core"

local F = {}

-- ---------------------------------------------------------------- admin

-- A plain connection that reconnects (within a bound) when the server
-- restarts under it, and runs a statement again that the server rolled
-- back as a deadlock or serialization failure; spec code uses it like
-- core.connect's.
local Admin = {}
Admin.__index = Admin

function F.admin(dsn)
  return setmetatable({ dsn = dsn, conn = core.connect(dsn) }, Admin)
end

function Admin:call(method, sql, ...)
  local args = { n = select("#", ...), ... }
  local last
  local ok, res = pcall(H.wait_until, function()
    if not self.conn then
      local okc, c = pcall(core.connect, self.dsn)
      if not okc then last = c; return false end
      self.conn = c
    end
    local okq, r = pcall(self.conn[method], self.conn, sql, unpack(args, 1, args.n))
    if okq then return { r } end
    last = r
    -- A deadlock or serialization failure rolled the statement back: it
    -- runs again. The admin's statements run alone (autocommit), and one
    -- that updates many rows meets the hosts' transactions: "UPDATE
    -- passes SET target = n + 1" locks rows in the table's order while a
    -- batch of finishes updates its members' rows in its own, and the
    -- server then aborts one of the two (2 of 300 such updates against a
    -- working host; most likely what failed a soak in CI once).
    if type(r) == "table" and r.kind == "sql" and (r.sqlstate == "40P01" or r.sqlstate == "40001") then
      return false
    end
    -- any other SQL error is the spec's business; a dead connection is not
    if type(r) == "table" and r.kind == "sql" and r.sqlstate ~= "57P01" and not tostring(r.sqlstate):match("^08") then
      error(r, 0)
    end
    pcall(self.conn.close, self.conn)
    self.conn = nil
    return false
  end, 60, "the database to answer " .. sql:sub(1, 60))
  if not ok then error(tostring(res) .. " (last error: " .. tostring(last) .. ")", 2) end
  return res[1]
end

function Admin:query(sql, ...) return self:call("query", sql, ...) end
function Admin:one(sql, ...) return self:call("one", sql, ...) end
function Admin:exec(sql, ...) return self:call("exec", sql, ...) end
function Admin:close() if self.conn then self.conn:close() end self.conn = nil end
function Admin:count(sql, ...)
  return self:one("SELECT count(*) AS n FROM (" .. sql .. ") q", ...).n
end

-- ---------------------------------------------------------------- database

-- A migrated database on `server` (default: the shared one) with the audit
-- tables: passes (how many times each machine must be worked, and has
-- been) and intervals (one row per finished item, written by its body).
-- Returns dsn, admin, server.
function F.database(server)
  server = server or H.postgres()
  local dsn, admin = F.prepare(server:create_db())
  return dsn, admin, server
end

-- The same on a database that exists (dsn): returns dsn, admin.
function F.prepare(dsn)
  local code, out, err = H.run({ H.bin, "migrate" }, { env = { BMDB_DSN = dsn } })
  assert(code == 0, "migrate failed: " .. out .. err)
  local admin = F.admin(dsn)
  admin:exec([[CREATE TABLE passes (machine_id UUID PRIMARY KEY REFERENCES machines,
               n INT8 NOT NULL DEFAULT 0, target INT8 NOT NULL)]])
  admin:exec([[CREATE TABLE intervals (machine_id UUID NOT NULL, pass INT8 NOT NULL, host TEXT NOT NULL,
               session_id UUID NOT NULL, version TEXT NOT NULL, slot TEXT NOT NULL,
               started_at TIMESTAMPTZ NOT NULL, ended_at TIMESTAMPTZ NOT NULL)]])
  return dsn, admin
end

-- A server of the spec's own whose commits are durable once acknowledged
-- (synchronous_commit = on; the shared server runs with it off for speed,
-- and an immediate shutdown then loses the last commits it acknowledged,
-- which no host can make up for). fsync stays off: the machine does not
-- crash, only the server does.
function F.durable_server()
  local server = H.postgres { fresh = true }
  server:psql(server:dsn(), "ALTER SYSTEM SET synchronous_commit = on")
  server:restart()
  return server
end

-- n machines, each to be worked `target` times.
function F.machines(admin, n, target)
  local ids = {}
  for i = 1, n do
    ids[i] = admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
    admin:exec("INSERT INTO passes (machine_id, target) VALUES ($1, $2)", ids[i], target)
  end
  return ids
end

-- ---------------------------------------------------------------- the worker

-- The worker every fault spec runs, process "Fault". Environment: CONC
-- (slots), HOLD (a body sleeps a random 0..HOLD s, or HOLD s with FIXED
-- set), FAIL (the share of
-- bodies that raise), HOST (the name written in intervals). VERSION and
-- the body's extra lines are the caller's (the reload spec varies them).
-- A body prints "committed MACHINE PASS" once its finish has returned:
-- the host told it the rows are committed.
function F.script(opts)
  opts = opts or {}
  return ([[
local bmdb = require "bmdb"
local VERSION = %q
-- the slot's thread id: one slot keeps its thread across reloads
local f = io.open("/proc/thread-self/stat")
local SLOT = f:read("*n")
f:close()
math.randomseed(SLOT * 1000 + os.time())
local HOLD, FAIL = tonumber(os.getenv("HOLD") or "0.05"), tonumber(os.getenv("FAIL") or "0")
return {
  bmdb.worker {
    process = "Fault", concurrency = tonumber(os.getenv("CONC") or "4"), poll = 0.2,
    backoff = { initial = 1 },
    %s
    select = function(tx, limit)
      return tx:query([=[SELECT p.machine_id FROM passes p
        WHERE p.n < p.target AND NOT EXISTS (SELECT 1 FROM work_blocked b
          WHERE b.machine_id = p.machine_id AND b.process = 'Fault') LIMIT $1]=], limit)
    end,
    run = function(w)
      local start = bmdb.transact(function(tx)
        return tx:one("SELECT clock_timestamp()::TEXT AS t, n FROM passes WHERE machine_id = $1", w.machine)
      end)
      -- one write per line: slots share stdout, and one write is atomic
      io.stdout:write(("running %%s %%s\n"):format(w.machine, w.session_id))
      io.stdout:flush()
      bmdb.sleep(os.getenv("FIXED") and HOLD or math.random() * HOLD)
      %s
      if math.random() < FAIL then error("injected failure") end
      w:finish(function(tx)
        tx:exec([=[INSERT INTO intervals VALUES ($1, $2, $3, $4, $5, $6, $7, clock_timestamp())]=],
          w.machine, start.n + 1, os.getenv("HOST") or "?", w.session_id, VERSION, tostring(SLOT), start.t)
        tx:exec("UPDATE passes SET n = n + 1 WHERE machine_id = $1", w.machine)
      end)
      io.stdout:write(("committed %%s %%d\n"):format(w.machine, start.n + 1))
      io.stdout:flush()
    end,
  },
}
]]):format(opts.version or "v1", opts.fields or "", opts.body or "")
end

-- ---------------------------------------------------------------- hosts

-- A host named `name`: its connections carry application_name=name, so
-- the spec can find their server processes in pg_stat_activity.
function F.host(dsn, name, script, opts)
  opts = opts or {}
  local argv = { H.bin, "--interval", tostring(opts.interval or 2), "--component", "fault" }
  for _, a in ipairs(opts.args or {}) do argv[#argv + 1] = a end
  argv[#argv + 1] = script
  local env = { BMDB_DSN = dsn .. " application_name=" .. name, HOST = name }
  for k, v in pairs(opts.env or {}) do env[k] = v end
  local p = H.spawn { argv = argv, env = env }
  p.name = name
  return p
end

function F.count_lines(p, text)
  local _, n = p:stderr():gsub(text:gsub("%p", "%%%0"), "")
  return n
end

-- "committed MACHINE PASS" lines a host printed: {"m pass", ...}
function F.committed(p, into)
  into = into or {}
  for line in p:stdout():gmatch("[^\n]+") do
    local m, pass = line:match("^committed (%S+) (%d+)$")
    if m then into[#into + 1] = { m, tonumber(pass) } end
  end
  return into
end

-- Waits until every machine is worked to its target; on timeout the error
-- lists the work rows still held and the hosts' log lines other than
-- routine starts and finishes.
function F.wait_complete(admin, hosts, timeout)
  local ok, err = pcall(H.wait_until, function() return admin:count("SELECT 1 FROM passes WHERE n < target") == 0 end,
    timeout or 180, "every machine to be worked to its target")
  if ok then return end
  local lines = {}
  for _, r in ipairs(admin:query([[SELECT w.machine_id, w.session_id, s.deadline > now() AS live FROM work w
      LEFT JOIN sessions s USING (session_id)]])) do
    lines[#lines + 1] = "held: " .. r.machine_id .. " by " .. r.session_id .. " live=" .. tostring(r.live)
  end
  local held = admin:query("SELECT machine_id FROM work")
  for _, h in ipairs(hosts) do
    for _, r in ipairs(held) do
      lines[#lines + 1] = "--- " .. (h.name or h.pid) .. " on " .. r.machine_id .. ":"
      for l in h:stderr():gmatch("[^\n]+") do
        if l:find(r.machine_id, 1, true) then lines[#lines + 1] = l end
      end
    end
  end
  for _, h in ipairs(hosts) do lines[#lines + 1] = F.log_tail(h) end
  error(err .. "\n" .. table.concat(lines, "\n"), 2)
end

-- Waits for host h to exit after its SIGTERM and asserts it drained
-- cleanly (exit 0); a failure names the host, its exit code and its last
-- log lines.
function F.assert_drained(h, timeout)
  local code = h:wait(timeout or 60)
  if code ~= 0 then error((h.name or h.pid) .. " exited with " .. code .. " on SIGTERM\n" .. F.log_tail(h), 2) end
end

-- The last n (default 30) lines of a host's log other than routine starts
-- and finishes, under a line naming the host: what a failing fault spec
-- shows of a host whose whole log would run to megabytes.
function F.log_tail(h, n)
  local log = {}
  for l in h:stderr():gmatch("[^\n]+") do
    if not l:match('msg="work started"') and not l:match("result=finished") and not l:match("result=failed .*injected failure") then
      log[#log + 1] = l
    end
  end
  local lines = { "--- " .. (h.name or h.pid) .. ":" }
  for i = math.max(1, #log - (n or 30)), #log do lines[#lines + 1] = log[i] end
  return table.concat(lines, "\n")
end

-- ---------------------------------------------------------------- audit

-- Checks both records. Returns a table of counts; every count but items
-- must be 0 for the guarantees to hold:
--   overlaps    intervals of one machine that overlap, plus history
--               sequences where a second holder started before the first
--               ended, or an end was recorded by a session that did not
--               hold the item
--   twice       (machine, pass) done more than once
--   lost        committed rows a host reported that are not in the database,
--               plus machines not worked to their target when complete=true
--   mismatched  machines whose pass count, interval rows and Finished
--               events disagree
function F.audit(admin, committed, complete)
  local a = { items = admin:count("SELECT 1 FROM intervals") }
  a.overlaps = admin:count([[SELECT 1 FROM (SELECT started_at,
      lag(ended_at) OVER (PARTITION BY machine_id ORDER BY started_at, ended_at) AS prev
      FROM intervals) q WHERE started_at < prev]]) +
    admin:count([[SELECT 1 FROM (SELECT event, session_id,
      lag(event) OVER w AS pe, lag(session_id) OVER w AS ps FROM work_history
      WINDOW w AS (PARTITION BY machine_id, process ORDER BY occurred_at, history_id)) q
      WHERE (event = 'Started' AND pe = 'Started')
         OR (event <> 'Started' AND (pe IS DISTINCT FROM 'Started' OR ps <> session_id))]])
  a.twice = admin:count("SELECT 1 FROM intervals GROUP BY machine_id, pass HAVING count(*) > 1")
  -- One query for every committed row (a soak reports tens of thousands).
  local machines, passes = {}, {}
  for i, c in ipairs(committed or {}) do machines[i], passes[i] = c[1], tostring(c[2]) end
  a.lost = admin:count([[SELECT 1 FROM unnest($1::UUID[], $2::INT8[]) AS c (machine_id, pass)
      WHERE NOT EXISTS (SELECT 1 FROM intervals i WHERE i.machine_id = c.machine_id AND i.pass = c.pass)]],
    "{" .. table.concat(machines, ",") .. "}", "{" .. table.concat(passes, ",") .. "}")
  if complete then a.lost = a.lost + admin:count("SELECT 1 FROM passes WHERE n < target") end
  a.mismatched = admin:count([[SELECT 1 FROM passes p WHERE p.n <> (SELECT count(*) FROM intervals i
        WHERE i.machine_id = p.machine_id)
      OR p.n <> (SELECT count(*) FROM work_history h WHERE h.machine_id = p.machine_id
        AND h.process = 'Fault' AND h.event = 'Finished')]])
  return a
end

-- Asserts the audit found nothing wrong; returns it.
function F.assert_clean(admin, committed, complete)
  local a = F.audit(admin, committed, complete)
  assert(a.overlaps == 0, a.overlaps .. " overlapping holders")
  assert(a.twice == 0, a.twice .. " items done twice")
  assert(a.lost == 0, a.lost .. " items or committed rows lost")
  assert(a.mismatched == 0, a.mismatched .. " machines whose passes, intervals and history disagree")
  return a
end

-- ---------------------------------------------------------------- figures

-- Appends one spec's counts to $BMDB_FIGURES (make check-all prints the
-- table with spec/fault/figures.lua). Keys: items, killed, faults,
-- survived, bad_inputs, lost, overlaps; flow_s (optional: seconds from a
-- fault until items flowed again, listed under the table).
function F.figures(name, counts)
  local path = os.getenv("BMDB_FIGURES")
  if not path or path == "" then return end
  local f = assert(io.open(path, "a"))
  local parts = { name, "run=" .. (os.getenv("BMDB_FIGURES_RUN") or "") }
  for _, k in ipairs { "items", "killed", "faults", "survived", "bad_inputs", "lost", "overlaps" } do
    parts[#parts + 1] = k .. "=" .. tostring(counts[k] or 0)
  end
  if counts.flow_s then parts[#parts + 1] = ("flow_s=%.1f"):format(counts.flow_s) end
  f:write(table.concat(parts, "\t"), "\n")
  f:close()
end

return F
