-- bmdb/gauge.lua -- fleet gauges (bmdb.gauge): a gauge whose series are
-- the rows of one SQL query, run by a built-in singleton loop, so that the
-- fleet's numbers are exported by exactly one host (docs/operations.md,
-- "Your own metrics").
--
--   bmdb.gauge { name = "fleet_machines_by_region", help = "...", every = 30,
--                sql = [[SELECT region, count(*) FROM machines GROUP BY 1]] }
--
-- returns a Loop definition (bmdb.loop's) a worker script returns beside
-- its workers. Each run reads the query in one fenced, read-only
-- transaction and makes this host's series of the metric exactly its
-- rows: every column but the last is a label (named by the column), the
-- last is the value. A label set the query no longer returns is removed;
-- when the host stops holding the loop (released, lost, reloaded away)
-- every series goes, so only the holder exports the gauge.
--
-- The family is defined at the first run, when the columns are known
-- (bmdb.metrics' rules: a definition is one per name for the process, and
-- a reload that changes the columns is refused at its first run, logged).
local core = require "bmdb.core"
local K = core.kinds
local U = require "bmdb.util"
local T = require "bmdb.transact"
local raise, finite = U.raise, U.finite

local G = {}

local known_fields = { name = true, help = true, every = true, sql = true }
-- A loop's name is at most 58 characters (bmdb.loop), and "gauge:" takes 6.
local NAME_MAX = 52

-- The problems of a definition, as bmdb.worker's are listed.
function G.problems(def)
  local problems = {}
  local function bad(msg) problems[#problems + 1] = msg end
  if type(def) ~= "table" then
    bad("a gauge definition must be a table, got " .. type(def))
    return problems
  end
  local name = type(def.name) == "string" and def.name or "?"
  local where = "gauge " .. name .. ": "
  local why = core.metric_check("gauge", def.name)
  if why then bad("gauge: " .. why) end
  if not why and #def.name > NAME_MAX then
    bad("gauge: name '" .. def.name .. "' is " .. #def.name .. " characters, at most " .. NAME_MAX ..
        " (its loop is gauge:<name>)")
  end
  if def.help ~= nil and type(def.help) ~= "string" then
    bad(where .. "help must be a string, got " .. type(def.help))
  end
  if type(def.sql) ~= "string" or not def.sql:find("%S") then
    bad(where .. "sql must be a non-empty string (the query whose rows are the series), got " ..
        (type(def.sql) == "string" and "an empty one" or type(def.sql)))
  end
  if not finite(def.every) or def.every <= 0 then
    bad(where .. "every must be a number of seconds above 0, got " .. tostring(def.every))
  end
  for k in pairs(def) do
    if not known_fields[k] then bad(where .. "unknown field '" .. tostring(k) .. "'") end
  end
  return problems
end

-- A label value as the registry takes it: a string or a number's text;
-- nil with why for anything else.
local function label_value(v, column)
  local t = type(v)
  if t == "string" then return v end
  if t == "number" or t == "boolean" then return tostring(v) end
  if v == nil then return nil, "label '" .. column .. "' is NULL" end
  return nil, "label '" .. column .. "' is a " .. t
end

-- The value column: a number, or the exact text of one (an integer past
-- 2^53, a numeric a double does not hold exactly, as results give them).
local function gauge_value(v, column)
  if type(v) == "number" and v == v then return v end
  if type(v) == "string" and v:match("^%s*[-+]?[%d.]+[eE]?[-+]?%d*%s*$") and tonumber(v) then
    return tonumber(v)
  end
  if v == nil then return nil, "the value ('" .. column .. "', the last column) is NULL" end
  return nil, "the value ('" .. column .. "', the last column) is not a number: " ..
             (type(v) == "table" and U.describe(v) or tostring(v))
end

-- The series a query's answer makes: a list of {values = {...}, value =
-- n}, keyed too by their label set. Raises naming the first bad row.
function G.series(metric, names, rows)
  if #names < 1 then raise(K.usage, 0, "gauge " .. metric .. ": the query returned no columns") end
  local out, seen = {}, {}
  local nl = #names - 1
  for i, row in ipairs(rows) do
    local values = {}
    for c = 1, nl do
      local v, why = label_value(row[c], names[c])
      if not v then raise(K.usage, 0, "gauge " .. metric .. ": row " .. i .. ": " .. why) end
      values[c] = v
    end
    local value, why = gauge_value(row[#names], names[#names])
    if not value then raise(K.usage, 0, "gauge " .. metric .. ": row " .. i .. ": " .. why) end
    local key = table.concat(values, "\0")
    if seen[key] then
      raise(K.usage, 0, "gauge " .. metric .. ": rows " .. seen[key] .. " and " .. i ..
            " have the same labels (" .. table.concat(values, ", ") .. ")")
    end
    seen[key] = i
    out[#out + 1] = { key = key, values = values, value = value }
  end
  return out
end

-- The gauge's state in this Lua state (the loop's): its family once
-- defined, and the series this host exports now, by label set.
local function state(def)
  local s = { family = nil, shown = {} }

  -- Makes the exported series exactly `series`: sets each, then removes
  -- those of the last run that are gone (so a scrape in between sees the
  -- new value or the old, never a hole).
  function s.apply(names, series)
    if not s.family then
      local labels = {}
      for c = 1, #names - 1 do labels[c] = names[c] end
      s.family = core.metric_gauge(def.name, def.help or "", labels)
      -- A state before this one (the code before a reload, which kept the
      -- hold) may have left series this one never saw.
      core.metric_remove(s.family)
    end
    local now = {}
    for _, x in ipairs(series) do
      s.family:set(x.value, unpack(x.values))
      now[x.key] = x.values
    end
    for key, values in pairs(s.shown) do
      if not now[key] then core.metric_remove(s.family, values) end
    end
    s.shown = now
  end

  function s.clear()
    if s.family then core.metric_remove(s.family) end
    s.shown = {}
  end

  -- One run: the query under the loop's fence, read-only; the series set
  -- only while the hold is still this host's (a hold lost meanwhile is
  -- followed by the release, which clears them anyway).
  function s.run(l)
    local names, rows = T.transact(function(tx)
      tx:exec("SET LOCAL transaction_read_only = on")
      return core.metric_rows(tx, def.sql)
    end)
    local series = G.series(def.name, names, rows)
    if l == nil or l:alive() then s.apply(names, series) end
    return #series
  end

  return s
end
G.state = state

-- A loop named loop_name is gone from this host's script (a reload
-- removed it): if it was a fleet gauge, its series go, as at a release.
function G.removed(loop_name)
  local metric = type(loop_name) == "string" and loop_name:match("^gauge:(.+)$")
  if metric then core.metric_remove(metric) end
end

-- bmdb.gauge{name=, help=, every=, sql=}
function G.gauge(def)
  local problems = G.problems(def)
  if #problems > 0 then raise(K.definition, 2, table.concat(problems, "; ")) end
  local d = { name = def.name, help = def.help, every = def.every, sql = def.sql }
  local s = state(d)
  return require("bmdb.loop").define {
    name = "gauge:" .. d.name,
    every = d.every,
    _builtin = true,
    run = function(l) s.run(l) end,
    _on_release = s.clear,
  }
end

return G
