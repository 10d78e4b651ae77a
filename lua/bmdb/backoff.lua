-- bmdb/backoff.lua -- backoff specs (docs/api.md, "Backoff"): what a spec may
-- be, the period after a failure (bmdb.backoff_next), and the spec as a
-- claim stores it in its work row (claim_opts).
local U = require "bmdb.util"
local argerror, finite = U.argerror, U.finite

local M = {}

-- Raises naming what is wrong with a backoff spec, argument n of fname: a
-- wrong type, or a field that is not a finite number (NaN would store
-- "nan" seconds, infinity never ends).
local function check_spec(spec, n, fname, level)
  if spec == nil then return end
  local function bad(msg) argerror(level + 2, n, fname, msg) end
  if type(spec) == "number" then
    if not finite(spec) then bad("backoff must be a finite number of seconds, got " .. tostring(spec)) end
    return
  end
  if type(spec) ~= "table" then
    bad("backoff: expected a table {initial=, maximum=, exponent=} or a number, got " .. type(spec))
  end
  for _, k in ipairs { "initial", "maximum", "exponent" } do
    local v = spec[k]
    if v ~= nil and not finite(v) then
      bad("backoff." .. k .. " must be a finite number, got " .. (type(v) == "number" and tostring(v) or type(v)))
    end
  end
end
M.check_spec = check_spec

-- A worker definition's backoff: raises a message (no position, no
-- error object) that bmdb.problems collects.
function M.check_definition(spec, where)
  if spec == nil then return end
  if type(spec) == "number" then
    if finite(spec) then return end
    error(where .. "backoff must be a finite number of seconds, got " .. tostring(spec), 0)
  end
  if type(spec) ~= "table" then
    error(where .. "backoff must be a table {initial=, maximum=, exponent=}, got " .. type(spec), 0)
  end
  for k, v in pairs(spec) do
    if k ~= "initial" and k ~= "maximum" and k ~= "exponent" then
      error(where .. "unknown backoff field '" .. tostring(k) .. "'", 0)
    end
    if not finite(v) then
      error(where .. "backoff." .. k .. " must be a finite number, got " ..
            (type(v) == "number" and tostring(v) or type(v)), 0)
    end
  end
end

-- The exponent as the decimal its user wrote, m / 10^d with m an integer:
-- the shortest fixed-point text that reads back as the same double.
local function decimal(x)
  for d = 0, 17 do
    local text = string.format("%." .. d .. "f", x)
    if tonumber(text) == x then return tonumber((text:gsub("%.", ""))), 10 ^ d end
  end
end

local EXACT = 2 ^ 53

-- ceil(last * exponent), exact for the decimal the user wrote: 90 * 1.1 is
-- 99, although the doubles multiply to 99.00000000000001. Splits exponent
-- into whole and fractional parts so the integer products stay below 2^53.
local function grow(last, exponent)
  local m, scale = decimal(exponent)
  if m and m < EXACT then
    local whole = math.floor(exponent)
    local frac = m - whole * scale -- the fractional digits, as an integer
    local p = last * frac
    if frac >= 0 and p < EXACT and last * whole < EXACT then
      local q = math.floor(p / scale)
      if q * scale < p then q = q + 1 end
      return last * whole + q
    end
  end
  -- Beyond exact integers (absurd periods): the double is as good as any.
  return math.ceil(last * exponent)
end

-- Backoff periods (docs/api.md, "Backoff"): whole seconds, never below 1. Without a spec
-- the previous period is kept; without exponent > 1 a spec gives `initial`;
-- otherwise each consecutive failure multiplies, rounds up and caps.
function M.backoff_next(spec, last)
  if last ~= nil then
    if not finite(last) then
      argerror(2, 2, "backoff_next", "the last period must be a finite number of seconds, got " .. tostring(last))
    end
    last = math.max(1, math.ceil(last))
  end
  if spec == nil then return last or 1 end
  check_spec(spec, 1, "backoff_next", 1)
  if type(spec) == "number" then spec = { initial = spec } end
  local initial = math.max(1, math.ceil(spec.initial or 1))
  local maximum = math.max(initial, math.ceil(spec.maximum or initial))
  local exponent = math.max(1, spec.exponent or 1)
  if exponent <= 1 or last == nil then return initial end
  if last * exponent >= maximum then return maximum end
  return math.min(maximum, grow(last, exponent))
end

-- What a claim stores in its work row: the timeout, and the backoff spec
-- normalized by backoff_next's rules, which whoever records the item's
-- death (a takeover, a collection) applies in SQL.
function M.claim_opts(spec, timeout)
  local o = { timeout = timeout }
  if type(spec) == "number" then spec = { initial = spec } end
  if type(spec) == "table" then
    o.initial = math.max(1, math.ceil(spec.initial or 1))
    o.maximum = math.max(o.initial, math.ceil(spec.maximum or o.initial))
    o.exponent = math.max(1, spec.exponent or 1)
  end
  return o
end

return M
