-- bmdb/util.lua -- what every bmdb module shares: error objects raised at
-- the caller's position (raise, argerror), is_error, finite, describe, a
-- readable text for any value a body raises, and outage, which hands the
-- database's own failures to the host's one account of an outage. A leaf
-- over bmdb.core.
local core = require "bmdb.core"
local K = core.kinds

local M = {}

-- Raises an error object of kind with msg, prefixed with the position of
-- the code at `level` (as error()'s level: 1 is the function calling raise).
local function raise(kind, level, msg)
  local info = level > 0 and debug.getinfo(level + 1, "Sl")
  local at = info and info.currentline > 0 and (info.short_src .. ":" .. info.currentline .. ": ") or ""
  error(core.error(kind, at .. msg), 0)
end
M.raise = raise

-- A bad argument, worded as luaL_argerror words it: "bad argument #2 to
-- 'work' (invalid process name ...)".
function M.argerror(level, n, fname, msg)
  raise(K.usage, level + 1, "bad argument #" .. n .. " to '" .. fname .. "' (" .. msg .. ")")
end

function M.is_error(v, kind)
  return core.is_error(v) and (kind == nil or v.kind == kind)
end

function M.finite(v)
  return type(v) == "number" and v == v and v ~= math.huge and v ~= -math.huge
end

-- A short, readable text of a table: sorted keys, at most a few entries.
local function serialize(t)
  local keys = {}
  for k in next, t do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  local parts = {}
  for i, k in ipairs(keys) do
    if i > 8 then parts[#parts + 1] = "..." break end
    local v = rawget(t, k)
    local text = type(v) == "string" and string.format("%q", #v > 80 and v:sub(1, 80) .. "..." or v)
                 or (type(v) == "number" or type(v) == "boolean") and tostring(v) or type(v)
    parts[#parts + 1] = (type(k) == "string" and k:match("^[%a_][%w_]*$") and k or "[" .. tostring(k) .. "]") ..
                        "=" .. text
  end
  return "{" .. table.concat(parts, ", ") .. "}"
end

-- A readable text for any value a body raises: "table: 0x..." tells the
-- reader of the history nothing. A table's own __tostring or message
-- field wins; else a short serialization.
function M.describe(v)
  local t = type(v)
  if t == "string" then return v end
  if t == "number" then return tostring(v) end
  if t == "table" then
    local mt = getmetatable(v)
    if type(mt) == "table" and mt.__tostring then
      local ok, text = pcall(tostring, v)
      if ok and type(text) == "string" then return text end
    end
    local ok, msg = pcall(function() return v.message end)
    if ok and (type(msg) == "string" or type(msg) == "number") then return tostring(msg) end
    return "(error object is a table: " .. serialize(v) .. ")"
  end
  if t == "nil" then return "(error object is a nil value)" end
  return "(error object is a " .. t .. " value: " .. tostring(v) .. ")"
end

-- True when err, met while `what` (a claim, a loop's look) ran, is the
-- database's failure rather than this code's: the server out of reach,
-- or a read-only standby (the host logs the outage once: host/outage.h),
-- or a session lost to an outage already under way. The caller logs
-- nothing more then; otherwise err is its own to report.
function M.outage(what, err)
  local is_error = M.is_error
  if is_error(err, K.connection) or (is_error(err, K.sql) and (err.sqlstate == "25006" or err.sqlstate == "0A000")) then
    core.outage_failed(what, M.describe(err))
    return true
  end
  return is_error(err, K.session_expired) and core.outage_counted()
end

return M
