-- bmdb/define.lua -- worker definitions: bmdb.worker{...} checks one
-- (problems) and returns it with its defaults filled in; workers reads
-- the list a script returned, specs what the host needs of it and of the
-- script's loops (loop.lua) (lstate.c).
local core = require "bmdb.core"
local K = core.kinds
local U = require "bmdb.util"
local B = require "bmdb.backoff"
local P = require "bmdb.policy"
local L = require "bmdb.loop"
local raise, finite = U.raise, U.finite

local M = {}

local Worker = {}
Worker.__index = Worker

local known_fields = { process = true, concurrency = true, backoff = true, select = true, run = true,
                       poll = true, batch = true, timeout = true, ahead = true }

-- The most items a worker may hold claimed ahead of its slots (a host's
-- queue of handed items holds SCHED_QUEUE_MAX, 64, per process).
local AHEAD_MAX = 32
-- Candidates a select is asked for by default: 16, or as many as the
-- claim locks when it locks more (several slots, or items claimed ahead).
local BATCH_DEFAULT = 16

-- Validates a definition; returns the problems found (empty when valid).
function M.problems(def)
  local problems = {}
  local function bad(msg) problems[#problems + 1] = msg end
  if type(def) ~= "table" then
    bad("a worker definition must be a table, got " .. type(def))
    return problems
  end
  local name = type(def.process) == "string" and def.process or "?"
  local where = "worker " .. name .. ": "
  if not core.valid_process(def.process) then
    bad("worker: process must be a name of letters, digits and _ starting with a letter (at most 63), got " ..
        string.format("%q", tostring(def.process)))
  end
  local c = def.concurrency
  if c ~= nil and (not finite(c) or c < 1 or c ~= math.floor(c) or c > 256) then
    bad(where .. "concurrency must be a whole number from 1 to 256, got " .. tostring(c))
  end
  if type(def.select) ~= "function" then bad(where .. "select must be a function(tx, limit), got " .. type(def.select)) end
  if type(def.run) ~= "function" then bad(where .. "run must be a function(w), got " .. type(def.run)) end
  if def.poll ~= nil and (not finite(def.poll) or def.poll <= 0) then
    bad(where .. "poll must be a number of seconds above 0, got " .. tostring(def.poll))
  end
  if def.timeout ~= nil and (not finite(def.timeout) or def.timeout <= 0) then
    bad(where .. "timeout must be a number of seconds above 0, got " .. tostring(def.timeout))
  end
  local b = def.batch
  if b ~= nil and (not finite(b) or b < 1 or b ~= math.floor(b)) then
    bad(where .. "batch must be a whole number of candidates of at least 1, got " .. tostring(b))
  end
  local a = def.ahead
  if a ~= nil and (not finite(a) or a < 0 or a ~= math.floor(a) or a > AHEAD_MAX) then
    bad(where .. "ahead must be a whole number of items from 0 to " .. AHEAD_MAX .. ", got " .. tostring(a))
  end
  local ok, err = pcall(B.check_definition, def.backoff, where)
  if not ok then bad(err) end
  for k in pairs(def) do
    if not known_fields[k] then bad(where .. "unknown field '" .. tostring(k) .. "'") end
  end
  return problems
end

-- bmdb.worker{process=, concurrency=, backoff=, select=, run=, poll=, batch=,
-- timeout=, ahead=}
function M.worker(def)
  local problems = M.problems(def)
  if #problems > 0 then raise(K.definition, 2, table.concat(problems, "; ")) end
  local w = {}
  for k, v in pairs(def) do w[k] = v end
  w.concurrency = w.concurrency or 1
  w.poll = w.poll or 1
  w.batch_auto = w.batch == nil
  w.batch = w.batch or BATCH_DEFAULT
  w.ahead_auto = w.ahead == nil
  w.ahead = w.ahead or P.AHEAD_AUTO
  return setmetatable(w, Worker)
end

-- The workers a script returned: a list of bmdb.worker definitions (or one
-- alone), beside which it may return bmdb.loop definitions. nil when it
-- has no worker; raises naming every problem found.
function M.workers(result)
  if result == nil then return nil end
  if getmetatable(result) == Worker or L.is_loop(result) then result = { result } end
  if type(result) ~= "table" then return nil end
  local list, problems, seen = {}, {}, {}
  for i, def in ipairs(result) do
    if L.is_loop(def) then
      -- loop.lua's
    elseif getmetatable(def) ~= Worker then
      problems[#problems + 1] = "returned value #" .. i .. " is not a bmdb.worker{...} or bmdb.loop{...} definition"
    elseif seen[def.process] then
      problems[#problems + 1] = "two workers have process " .. def.process
    else
      seen[def.process] = true
      list[#list + 1] = def
    end
  end
  if #problems > 0 then raise(K.definition, 0, table.concat(problems, "; ")) end
  if #list == 0 then return nil end
  return list
end

-- What the host starts for a script: each worker's slots, and a thread
-- for each loop. nil for a one-off (no worker, no loop).
function M.specs(result)
  local specs = {}
  for i, def in ipairs(M.workers(result) or {}) do specs[i] = { process = def.process, concurrency = def.concurrency } end
  for _, l in ipairs(L.loops(result)) do specs[#specs + 1] = { process = l.name, concurrency = 1, loop = true } end
  if #specs == 0 then return nil end
  return specs
end

return M
