-- bmdb/limit.lua -- limits shared by every slot of every host:
-- bmdb.limit(name, spec) (docs/talking-to-the-world.md, "Limits shared by the fleet").
--
-- A limit is rows (migration 0007), so it holds across hosts and restarts.
-- A rate limit is one row of `limits` with its GCRA state, tat (the
-- theoretical arrival time): every take is one statement that moves tat
-- on by the emission interval T = per / rate and returns how long the
-- caller must wait for the token it just reserved (0 within the burst);
-- the caller then waits that long in C, cancellably. A concurrency
-- limit's places are rows of `limit_places` owned by sessions: a take
-- inserts the lowest free place or, with none free, waits for a release
-- (this host's at once, another's by NOTIFY bmdb_limit), for a holder's
-- session to expire, or for its recheck period, and then tries again.
-- The waits are host/llimit.c's; every take's transaction is
-- bmdb.transact's, so it runs under the caller's fence: a body whose lock
-- or session is gone gets nothing.
local core = require "bmdb.core"
local K = core.kinds
local T = require "bmdb.transact"
local W = require "bmdb.work"

local M = {}

-- Until a holder's session is past its deadline in the database (its
-- places are then free), plus this much: the database's clock decides.
local EXPIRY_SLACK = 0.05
-- How often a concurrency wait looks again by default when nothing woke
-- it: the bound on its statements on a server without notifications.
local RECHECK = 2

local RATE_SQL = [[
WITH up AS (
  INSERT INTO limits (name, kind, rate, per, burst, tat)
  VALUES ($1, 'rate', $2, $3, $4, now() + $5::FLOAT8 * INTERVAL '1 second')
  ON CONFLICT (name) DO UPDATE SET
    rate = excluded.rate, per = excluded.per, burst = excluded.burst, updated_at = now(),
    tat = greatest(limits.tat, now()) + $5::FLOAT8 * INTERVAL '1 second'
  WHERE limits.kind = 'rate' AND ($7::FLOAT8 IS NULL OR
    greatest(limits.tat, now()) - $6::FLOAT8 * INTERVAL '1 second'
      <= now() + $7::FLOAT8 * INTERVAL '1 second')
  RETURNING tat
)
SELECT
  (SELECT greatest(0, extract(epoch FROM up.tat - $5::FLOAT8 * INTERVAL '1 second'
                                - $6::FLOAT8 * INTERVAL '1 second' - now())::FLOAT8) FROM up) AS wait,
  (SELECT kind FROM limits WHERE name = $1) AS kind,
  (SELECT greatest(0, extract(epoch FROM greatest(l.tat, now()) - $6::FLOAT8 * INTERVAL '1 second'
                                - now())::FLOAT8) FROM limits l WHERE l.name = $1) AS would_wait]]

-- Rides in front of every concurrency take (tx:defer): the places of
-- sessions past their deadline are free, collected or not.
local EXPIRED_SQL = [[
DELETE FROM limit_places WHERE name = $1
  AND session_id IN (SELECT session_id FROM sessions WHERE deadline <= now())]]

-- The lowest free place, if fewer than $2 are held, for session $3 with
-- token $4; the spec stored on the way (refused for a rate limit's
-- name). Also when the first holder's session would expire, for a wait.
local PLACE_SQL = [[
WITH spec AS (
  INSERT INTO limits (name, kind, concurrency) VALUES ($1, 'concurrency', $2)
  ON CONFLICT (name) DO UPDATE SET concurrency = excluded.concurrency, updated_at = now()
  WHERE limits.kind = 'concurrency'
  RETURNING name
), held AS (
  SELECT place FROM limit_places WHERE name = $1
), got AS (
  INSERT INTO limit_places (name, place, session_id, token)
  SELECT $1, c.n, $3::UUID, $4::UUID
  FROM (SELECT 0::INT8 AS n UNION ALL SELECT place + 1 FROM held) c
  WHERE c.n NOT IN (SELECT place FROM held)
    AND EXISTS (SELECT 1 FROM spec)
    AND (SELECT count(*) FROM held) < $2
    AND EXISTS (SELECT 1 FROM sessions s WHERE s.session_id = $3::UUID AND s.deadline > now())
  ORDER BY c.n LIMIT 1
  RETURNING place
)
SELECT
  (SELECT place FROM got) AS place,
  (SELECT count(*) FROM spec) AS spec_ok,
  (SELECT kind FROM limits WHERE name = $1) AS kind,
  (SELECT extract(epoch FROM min(s.deadline) - now())::FLOAT8
     FROM limit_places p JOIN sessions s ON s.session_id = p.session_id WHERE p.name = $1) AS expires_in]]

-- ------------------------------------------------------------ errors

-- Raises an error object of kind with msg and fields, at the position of
-- the code at `level` (as error()'s level: 1 is the function calling it).
local function raise(kind, level, msg, fields)
  local info = level > 0 and debug.getinfo(level + 1, "Sl")
  local at = info and info.currentline > 0 and (info.short_src .. ":" .. info.currentline .. ": ") or ""
  local e = core.error(kind, at .. msg)
  for k, v in pairs(fields or {}) do e[k] = v end
  error(e, 0)
end

local function shown(v)
  if type(v) == "string" then return string.format("%q", v) end
  if type(v) == "number" or type(v) == "boolean" then return tostring(v) end
  return type(v)
end

-- A bad argument, worded as luaL_argerror words it, naming the field.
local function bad(level, n, fname, field, msg)
  raise(K.usage, level + 1, "bad argument #" .. n .. " to '" .. fname .. "' (" .. msg .. ")", { field = field })
end

local function finite(v) return type(v) == "number" and v == v and v ~= math.huge and v ~= -math.huge end
local function whole(v) return finite(v) and v == math.floor(v) end

local function valid_name(name)
  return type(name) == "string" and #name <= 63 and name:match("^[A-Za-z][A-Za-z0-9_.:%-]*$") ~= nil
end

local FIELDS = { rate = true, per = true, burst = true, concurrency = true, recheck = true }

-- The limiter's spec, checked; raises usage naming the field at fault.
local function check_spec(name, spec)
  local level = 3 -- the caller of bmdb.limit
  if not valid_name(name) then
    bad(level, 1, "limit", "name", "limit name must be a letter, then letters, digits, '_', '.', ':' or '-', " ..
        "at most 63 characters, got " .. shown(name))
  end
  if type(spec) ~= "table" then
    bad(level, 2, "limit", nil, "spec: table expected ({rate = N, per = SECONDS, burst = B} or " ..
        "{concurrency = N}), got " .. type(spec))
  end
  for k in pairs(spec) do
    if not FIELDS[k] then
      bad(level, 2, "limit", tostring(k), "unknown field " .. shown(k) ..
          " (a limit has rate, per, burst, concurrency and recheck)")
    end
  end
  local function positive(field, v)
    if not finite(v) or v <= 0 then
      bad(level + 1, 2, "limit", field, field .. " must be a positive finite number, got " .. shown(v))
    end
  end
  local l = { name = name, recheck = RECHECK }
  if spec.recheck ~= nil then
    positive("recheck", spec.recheck)
    l.recheck = spec.recheck
  end
  if spec.rate ~= nil and spec.concurrency ~= nil then
    bad(level, 2, "limit", "concurrency", "give rate or concurrency, not both (two limits need two names)")
  end
  if spec.concurrency ~= nil then
    local n = spec.concurrency
    if not whole(n) or n < 1 or n > 2 ^ 31 then
      bad(level, 2, "limit", "concurrency", "concurrency must be a whole number of places from 1 to 2^31, got " ..
          shown(n))
    end
    for _, k in ipairs { "per", "burst" } do
      if spec[k] ~= nil then bad(level, 2, "limit", k, k .. " is a field of rate limits, not of concurrency limits") end
    end
    l.kind, l.concurrency = "concurrency", n
    return l
  end
  if spec.rate == nil then
    bad(level, 2, "limit", "rate", "a limit needs rate = N (with per = SECONDS, burst = B) or concurrency = N")
  end
  positive("rate", spec.rate)
  local per, burst = spec.per, spec.burst
  if per == nil then per = 1 else positive("per", per) end
  if burst == nil then
    burst = 1
  elseif not whole(burst) or burst < 1 then
    bad(level, 2, "limit", "burst", "burst must be a whole number >= 1, got " .. shown(burst))
  end
  -- The database keeps microseconds; an interval below one would let
  -- every take through, and one beyond 30 years is surely a mistake.
  local T = per / spec.rate
  if T < 1e-6 then
    bad(level, 2, "limit", "rate", "rate / per must be at most one take a microsecond, got " ..
        spec.rate .. " per " .. per .. "s")
  end
  if T * burst > 1e9 then
    bad(level, 2, "limit", "per", "per / rate * burst must be under 10^9 seconds, got " .. T * burst)
  end
  l.kind, l.rate, l.per, l.burst, l.T, l.tau = "rate", spec.rate, per, burst, T, (burst - 1) * T
  return l
end

local function check_take_opts(opts)
  if opts == nil then return nil end
  if type(opts) ~= "table" then bad(3, 1, "take", nil, "options: table expected ({max_wait = SECONDS}), got " .. type(opts)) end
  for k in pairs(opts) do
    if k ~= "max_wait" then bad(3, 1, "take", tostring(k), "unknown option " .. shown(k) .. " (take has max_wait)") end
  end
  local m = opts.max_wait
  if m ~= nil and (not finite(m) or m < 0) then
    bad(3, 1, "take", "max_wait", "max_wait must be a finite number of seconds >= 0, got " .. shown(m))
  end
  return m
end

local function other_kind(l, kind)
  raise(K.usage, 0, "limit " .. l.name .. " is a " .. kind .. " limit in the database, and this script " ..
        "declares a " .. l.kind .. " limit by that name: a name is one limit (use another name)",
        { field = l.kind == "rate" and "rate" or "concurrency", limit = l.name })
end

-- ------------------------------------------------------------ what a take holds

-- What take returns: limit, waited (seconds), attempts (take statements
-- sent, one per look), and for a concurrency limit place and token.
local Held = {}
Held.__index = Held

function Held:release()
  if getmetatable(self) ~= Held then bad(2, 1, "release", nil, "a taken place expected, got " .. type(self)) end
  if self.released or not self.token then return false end
  local ok = core.limit_release(self._sess, self.limit, self.token)
  self.released = true
  local held = self._limiter._held
  for i = #held, 1, -1 do
    if held[i] == self then table.remove(held, i) end
  end
  return ok
end

-- ------------------------------------------------------------ takes

local Limiter = {}
Limiter.__index = Limiter

local function take_rate(l, max_wait, io)
  local started = core.now()
  local r = T.transact(function(tx)
    return tx:one(RATE_SQL, l.name, l.rate, l.per, l.burst, l.T, l.tau, max_wait)
  end)
  if r.wait == nil then
    if r.kind ~= "rate" then other_kind(l, r.kind or "different") end
    -- Reserving would wait past max_wait: nothing was reserved.
    raise(K.limit, 0, string.format("limit %s: the next token is %.3fs away, beyond max_wait %gs",
          l.name, r.would_wait, max_wait),
          { reason = "timeout", limit = l.name, wait = r.would_wait, max_wait = max_wait })
  end
  if r.wait > 0 then
    core.log("debug", "waiting for a limit", { "limit", l.name, "kind", "rate", "seconds", r.wait })
    core.limit_wait(l.name, r.wait, io, nil, started)
    core.limit_observe(l.name, core.now() - started)
  end
  return setmetatable({ limit = l.name, waited = core.now() - started, attempts = 1, _limiter = l }, Held)
end

-- Takes a place for sess (the caller's fence: its item's session in a
-- body) with token, waiting as long as max_wait allows (nil: for ever).
local function take_place(l, max_wait, token, io, sess)
  local sid = sess:id()
  local started = core.now()
  local deadline = max_wait and started + max_wait
  local attempts, waiting = 0, false
  while true do
    -- Read before the look: a release between the look and the wait
    -- ends the wait at once.
    local gen = core.limit_gen(l.name)
    attempts = attempts + 1
    local r = T.transact(function(tx)
      tx:defer(EXPIRED_SQL, l.name)
      return tx:one(PLACE_SQL, l.name, l.concurrency, sid, token)
    end)
    if r.place ~= nil then
      local waited = core.now() - started
      if waiting then core.limit_observe(l.name, waited) end
      return setmetatable({ limit = l.name, place = r.place, token = token, waited = waited,
                            attempts = attempts, _sess = sess, _limiter = l }, Held)
    end
    if r.spec_ok == 0 then other_kind(l, r.kind or "different") end
    local now = core.now()
    if deadline and now >= deadline then
      if waiting then core.limit_observe(l.name, now - started) end
      raise(K.limit, 0, string.format("limit %s: no place free within max_wait %gs (concurrency %d)",
            l.name, max_wait, l.concurrency), { reason = "timeout", limit = l.name, max_wait = max_wait })
    end
    if not waiting then
      waiting = true
      core.log("debug", "waiting for a limit", { "limit", l.name, "kind", "concurrency" })
    end
    local wait = l.recheck
    if r.expires_in then wait = math.min(wait, math.max(0, r.expires_in) + EXPIRY_SLACK) end
    if deadline then wait = math.min(wait, deadline - now) end
    core.limit_wait(l.name, wait, io, gen, started)
  end
end

-- Waits for a token (rate) or a free place (concurrency); see Held.
function Limiter:take(opts)
  if getmetatable(self) ~= Limiter then bad(2, 1, "take", nil, "use lim:take(), not lim.take()") end
  local max_wait = check_take_opts(opts)
  local io = T.io_session()
  if self.kind == "rate" then return take_rate(self, max_wait, io) end
  local sess = io or core.session()
  local h = core.limit_guard(self.name, sess, function(token)
    local h = take_place(self, max_wait, token, io, sess)
    self._held[#self._held + 1] = h -- last: lim:release() finds it
    return h
  end)
  -- A place a body forgot goes back with its item, not its session: a
  -- leak would otherwise stall every host on the limit until restarts.
  W.at_item_end(function()
    if h.released then return end
    core.log("warn", "a place the body took was not given back; giving it back as its item ended",
             { "limit", self.name, "place", h.place })
    h:release()
  end)
  return h
end

-- Takes, runs fn(...), and for a concurrency limit gives the place back
-- however fn ends; fn's results are returned, its error raised as it was.
function Limiter:run(fn, ...)
  if getmetatable(self) ~= Limiter then bad(2, 1, "run", nil, "use lim:run(fn, ...), not lim.run(fn, ...)") end
  if type(fn) ~= "function" then bad(2, 1, "run", nil, "function expected, got " .. type(fn)) end
  local io = T.io_session()
  if self.kind == "rate" then
    take_rate(self, nil, io)
    return fn(...)
  end
  local sess = io or core.session()
  return core.limit_guard(self.name, sess, function(token) return take_place(self, nil, token, io, sess) end, fn, ...)
end

-- Gives back held (a place this limiter's take returned), or without an
-- argument the last place it took in this Lua state that is still held.
-- True when a place went back; false when there was none (a rate
-- limit's tokens are spent once taken).
function Limiter:release(held)
  if getmetatable(self) ~= Limiter then bad(2, 1, "release", nil, "use lim:release(), not lim.release()") end
  if held == nil then
    held = self._held[#self._held]
    if held == nil then return false end
  elseif getmetatable(held) ~= Held or held.limit ~= self.name then
    bad(2, 1, "release", nil, "a place taken from limit " .. self.name .. " expected, got " .. shown(held))
  end
  return held:release()
end

function M.limit(name, spec)
  local l = check_spec(name, spec)
  l._held = {}
  return setmetatable(l, Limiter)
end

return M
