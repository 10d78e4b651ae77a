-- bmdb/testing.lua -- for operators' own busted specs of worker scripts.
--
--   local T = require "bmdb.testing"
--   local db = T.database()                       -- throwaway, migrated, connected
--   db:exec("INSERT INTO machines DEFAULT VALUES")
--   local r = T.run_one("my_workers.lua", "Provision")
--   assert.equal("Finished", r.event)
--   db:close()
--
-- The database is the host's own embedded PostgreSQL in a temporary
-- directory; run_one claims and runs exactly one item of a worker in this
-- process, deterministically (candidates in select's order), so a spec can
-- assert on the database afterwards.
local core = require "bmdb.core"
local D = require "bmdb.define"
local C = require "bmdb.claim"
local W = require "bmdb.work"

local T = {}

local Database = {}
Database.__index = Database

function Database:query(sql, ...) return self._conn:query(sql, ...) end
function Database:one(sql, ...) return self._conn:one(sql, ...) end
function Database:exec(sql, ...) return self._conn:exec(sql, ...) end

function Database:close()
  if self._closed then return end
  self._closed = true
  self._conn:close()
  core.close()
  self._server:close()
  -- the path came from mkdtemp: no quoting surprises
  os.execute("rm -rf '" .. self.dir .. "'")
end

-- A fresh database with every migration applied, and bmdb connected to it
-- with a live session. opts: component, interval (seconds), log_level
-- (what bmdb logs to stderr meanwhile; default "warn"), migrations (the
-- operator's own migrations directory, applied after the core's, as
-- bmdb-host --migrations DIR does).
function T.database(opts)
  opts = opts or {}
  local dir = core.tmpdir("bmdb-testing")
  local ok, server, dsn = pcall(core.embedded, dir .. "/db")
  if not ok then
    os.execute("rm -rf '" .. dir .. "'")
    error(server, 2)
  end
  core.open { dsn = dsn, component = opts.component or "bmdb.testing", interval = opts.interval or 5,
              log_level = opts.log_level, migrations = opts.migrations }
  return setmetatable({ dir = dir, dsn = dsn, _server = server, _conn = core.connect(dsn) }, Database)
end

-- Runs a worker script's top level here, as a slot would, and returns its
-- workers by process. args become the script's arg[1..].
function T.load(script, args)
  local dir = script:match("^(.*)/[^/]*$") or "."
  local saved_path, saved_arg = package.path, rawget(_G, "arg")
  package.path = dir .. "/?.lua;" .. dir .. "/?/init.lua;" .. package.path
  local a = { [0] = script }
  for i, v in ipairs(args or {}) do a[i] = v end
  _G.arg = a
  local chunk, err = loadfile(script)
  local ok, result = false, err
  if chunk then ok, result = pcall(chunk, unpack(a)) end
  package.path, _G.arg = saved_path, saved_arg
  if not ok then error(result, 2) end
  local workers = {}
  for _, def in ipairs(D.workers(result) or {}) do workers[def.process] = def end
  return workers
end

-- Claims and runs one item of `process` from `script`. opts: machine (only
-- that candidate), args. Returns nil when select offers nothing lockable,
-- else { machine, attempt, event = "Finished" | "Failed" | "Canceled",
-- error = the body's error or nil }.
function T.run_one(script, process, opts)
  opts = opts or {}
  local def = T.load(script, opts.args)[process]
  if not def then error(script .. " has no worker for process " .. tostring(process), 2) end
  local w = C.in_turn(def, { ordered = true, machine = opts.machine })
  if not w then return nil end
  local ok, err = pcall(W.run, w, def.run)
  return { machine = w.machine, attempt = w.attempt, event = w._decided or nil, error = (not ok) and err or nil }
end

return T
