-- bmdb/loop.lua -- singleton loops (bmdb.loop): a function that runs every
-- so often in exactly one host of the fleet, such as a reconcile loop.
--
-- A loop is a row of `loops` (migrations/0009) that one live session
-- holds, under a token; every transaction of a run is fenced by that row
-- with that token (host/tx.c, FENCE_LOOP_SQL), as a work body's are by its
-- item. Every host whose script returns the loop gives it a thread
-- (host/worker.c, serve_loop here): the holder runs it when it is due,
-- the others stand by and take the hold once the holder's session is gone
-- or past its deadline (a clean stop releases it at once). When a run is
-- due is in the row (next_run_at, set from the end of the last run, or by
-- the backoff of a failed one), so the spacing holds fleet-wide, across
-- takeovers. A run is tracked like a work item (host/items.c): its timeout
-- interrupts it and stops its bmdb.http and bmdb.exec calls.
local core = require "bmdb.core"
local K = core.kinds
local U = require "bmdb.util"
local B = require "bmdb.backoff"
local T = require "bmdb.transact"
local W = require "bmdb.work"
local raise, finite, is_error, describe = U.raise, U.finite, U.is_error, U.describe

local M = {}

local Loop = {}
Loop.__index = Loop

local known_fields = { name = true, every = true, timeout = true, backoff = true, run = true }
-- Only for the host's own loops (fleet gauges, retention): a name with ':'
-- (so it never meets an operator's), and what to do when this host stops
-- holding the loop.
local builtin_fields = { _builtin = true, _on_release = true }
-- Its idle queue is "loop:" .. name, which must fit a process name's 63.
local NAME_MAX = 58

-- Validates a definition; returns the problems found (empty when valid).
function M.problems(def, builtin)
  local problems = {}
  local function bad(msg) problems[#problems + 1] = msg end
  if type(def) ~= "table" then
    bad("a loop definition must be a table, got " .. type(def))
    return problems
  end
  local name = def.name
  local pattern = builtin and "^[A-Za-z][A-Za-z0-9_.:-]*$" or "^[A-Za-z][A-Za-z0-9_.-]*$"
  if type(name) ~= "string" or not name:match(pattern) or #name > NAME_MAX then
    bad("loop: name must be a letter followed by letters, digits, '_', '.' or '-' (at most " .. NAME_MAX ..
        "), got " .. string.format("%q", tostring(name)))
  end
  local where = "loop " .. tostring(name) .. ": "
  if not finite(def.every) or def.every <= 0 then
    bad(where .. "every must be a number of seconds above 0, got " .. tostring(def.every))
  end
  if def.timeout ~= nil and (not finite(def.timeout) or def.timeout <= 0) then
    bad(where .. "timeout must be a number of seconds above 0, got " .. tostring(def.timeout))
  end
  if type(def.run) ~= "function" then bad(where .. "run must be a function(l), got " .. type(def.run)) end
  local ok, err = pcall(B.check_definition, def.backoff, where)
  if not ok then bad(err) end
  if builtin and def._on_release ~= nil and type(def._on_release) ~= "function" then
    bad(where .. "_on_release must be a function")
  end
  for k in pairs(def) do
    if not known_fields[k] and not (builtin and builtin_fields[k]) then
      bad(where .. "unknown field '" .. tostring(k) .. "'")
    end
  end
  return problems
end

local function define(def, builtin)
  local problems = M.problems(def, builtin)
  if #problems > 0 then raise(K.definition, 3, table.concat(problems, "; ")) end
  local l = {}
  for k, v in pairs(def) do l[k] = v end
  -- A failed run is tried again after `every`, then twice as long each
  -- time, up to 16 intervals.
  l.backoff = l.backoff or { initial = l.every, maximum = 16 * l.every, exponent = 2 }
  return setmetatable(l, Loop)
end

-- bmdb.loop{name=, every=, timeout=, backoff=, run=}
function M.loop(def) return define(def, false) end
-- The same for the host's own loops, which may set _builtin and _on_release.
function M.define(def) return define(def, true) end
function M.is_loop(v) return getmetatable(v) == Loop end

-- The loops a script's result runs (a loop alone, or a list holding
-- loops beside workers), in order, and the host's own retention loop
-- (retention.lua; none with --keep-history 0) for any script that
-- returns definitions: a worker script. Raises naming two loops of one
-- name.
function M.loops(result)
  -- a definition alone (a loop's or a worker's metatable) stands for a list of one
  if type(result) == "table" and getmetatable(result) ~= nil then result = { result } end
  if type(result) ~= "table" then return {} end
  local list, seen = {}, {}
  for _, v in ipairs(result) do
    if M.is_loop(v) then
      if seen[v.name] then raise(K.definition, 0, "two loops are named " .. v.name) end
      seen[v.name] = true
      list[#list + 1] = v
    end
  end
  local retention = #result > 0 and require("bmdb.retention").loop()
  if retention then list[#list + 1] = retention end
  return list
end

-- ---- a run ------------------------------------------------------------------

local Run = {}
Run.__index = Run

-- False once the hold is lost: the host cancelling, the session gone, the
-- run's timeout passed.
function Run:alive()
  if self._lost or core.state() == "cancelling" or not T.item_session(self):alive() then return false end
  if self._deadline and core.now() >= self._deadline then
    self._lost = "timeout after " .. self._timeout .. "s"
  end
  return not self._lost
end

-- ---- the rows ---------------------------------------------------------------

local READ_SQL = [[
SELECT session_id::TEXT AS holder, token::TEXT AS token,
       EXISTS (SELECT 1 FROM sessions s WHERE s.session_id = loops.session_id AND s.deadline > now()) AS live,
       extract(epoch FROM next_run_at - now())::FLOAT8 AS due_in, failures, last_seconds
  FROM loops WHERE name = $1]]

-- What the hold is now, in one transaction of sess: nil when another
-- live session holds it; else this session's token (taken now if it was
-- free, recorded Taken) and the seconds until the next run is due. A
-- standby's look costs one read; only a take writes. The UPDATE waits
-- for the last transaction of the old holder's run (its fence locks the
-- row FOR SHARE to COMMIT), and two standbys taking at once conflict on
-- the row: the loser's transaction is retried, and then finds it held.
local function look(sess, def)
  local me = sess:id()
  return T.transact_on(sess, function(tx)
    local row = tx:query(READ_SQL, def.name)[1]
    if not row then
      tx:exec("INSERT INTO loops (name) VALUES ($1) ON CONFLICT (name) DO NOTHING", def.name)
      row = tx:query(READ_SQL, def.name)[1]
    end
    if row.holder == me and row.token then return row.token, row.due_in, row, false end
    if row.live then return nil end
    local token = tx:query("UPDATE loops SET session_id = $2, token = gen_random_uuid(), held_since = now() " ..
                           "WHERE name = $1 RETURNING token::TEXT AS token", def.name, me)[1].token
    tx:exec("INSERT INTO loop_history (name, session_id, event, cause) VALUES ($1, $2, 'Taken', $3)",
            def.name, me, row.holder and ("from " .. row.holder) or nil)
    return token, row.due_in, row, true
  end)
end

-- Lets the hold go (a clean stop, the loop removed by a reload), and says
-- so to the standbys, which take it at once. Best effort: if this fails,
-- the session's end frees the hold too.
local function release(sess, def, token)
  local ok, err = pcall(T.transact_on, sess, function(tx)
    local r = tx:exec("UPDATE loops SET session_id = NULL, token = NULL WHERE name = $1 AND token = $2",
                      def.name, token)
    if r > 0 then
      tx:exec("INSERT INTO loop_history (name, session_id, event) VALUES ($1, $2, 'Released')", def.name, sess:id())
    end
  end)
  if ok then pcall(T.send_wake, "loop:" .. def.name) end
  return ok, err
end

-- Records a run's start (fenced by the hold); returns the attempt (1 +
-- the consecutive failures before it).
local function record_start(l)
  return T.transact_on(l, function(tx)
    local row = tx:query("UPDATE loops SET last_started_at = now() WHERE name = $1 RETURNING failures", l.name)[1]
    tx:exec("INSERT INTO loop_history (name, session_id, event) VALUES ($1, $2, 'Started')", l.name, l.session_id)
    return row.failures + 1
  end)
end

-- Records how the run ended (fenced by the hold): the next run is due
-- `every` after a finish, or after the backoff of a failure.
local function record_end(l, def, cause)
  return T.transact_on(l, function(tx)
    if cause == nil then
      tx:exec("UPDATE loops SET last_finished_at = now(), next_run_at = now() + $2::FLOAT8 * INTERVAL '1 second', " ..
              "failures = 0, last_seconds = NULL, last_cause = NULL WHERE name = $1", l.name, def.every)
      tx:exec("INSERT INTO loop_history (name, session_id, event) VALUES ($1, $2, 'Finished')", l.name, l.session_id)
      return def.every
    end
    local cur = tx:query("SELECT last_seconds FROM loops WHERE name = $1", l.name)[1]
    local period = B.backoff_next(def.backoff, cur and cur.last_seconds)
    tx:exec("UPDATE loops SET last_finished_at = now(), next_run_at = now() + $2::FLOAT8 * INTERVAL '1 second', " ..
            "failures = failures + 1, last_seconds = $2, last_cause = $3 WHERE name = $1", l.name, period, cause)
    tx:exec("INSERT INTO loop_history (name, session_id, event, cause) VALUES ($1, $2, 'Failed', $3)",
            l.name, l.session_id, cause)
    return period
  end)
end

-- ---- the thread's loop --------------------------------------------------------

local function lost_error(err)
  return is_error(err, K.lost) or is_error(err, K.session_expired) or is_error(err, K.canceled)
end

-- This host's series of each loop (host/metrics.c): its runs by outcome,
-- their time, and whether it holds the loop.
local function count(name, outcome, seconds)
  if outcome == "held" or outcome == "standby" then
    core.loop_held(name, outcome == "held")
  else
    core.loop_run(name, outcome, seconds)
  end
end

-- One run of def on the hold (token) of sess. Returns when the hold was
-- lost, false; else true.
local function run_once(def, sess, token, row)
  local l = setmetatable({ name = def.name, session_id = sess:id(), _loop = true, _token = token,
                           _timeout = def.timeout }, Run)
  T.bind(l, sess)
  local ok, attempt = pcall(record_start, l)
  if not ok then
    if lost_error(attempt) then return false end
    if not U.outage("loop", attempt) then
      core.log("warn", "loop run not started", { "loop", def.name, "error", describe(attempt) })
    end
    core.idle_wait("loop:" .. def.name, 1)
    return true
  end
  l.attempt = attempt
  local started = core.now()
  l.started = started
  if def.timeout then l._deadline = started + def.timeout end
  core.log("info", "loop run started", { "loop", def.name, "attempt", attempt })
  local outer, outer_tx, depth = T.enter_item(l)
  core.track(token, "", def.name, 0, def.timeout or 0, started)
  local results = { xpcall(def.run, W.traceback, l) }
  if T.leave_item(outer, outer_tx, depth) then
    core.log("warn", "rolled back a transaction the loop's run left open (a coroutine yielded inside it)",
             { "loop", def.name })
  end
  local taken = core.item_lost(token) -- (items.c forgets it at the end)
  W.end_item(l, { "loop", def.name })
  local seconds = core.now() - started
  local err = not results[1] and results[2] or nil
  local timed_out = err and taken and taken:match("^timeout") and sess:alive() and core.state() ~= "cancelling"
  if timed_out then
    -- Its timeout took the run away, not the hold: a failure, recorded
    -- on the hold (its own fence, without the run's deadline).
    err = "timeout after " .. def.timeout .. "s"
    l = setmetatable({ name = def.name, session_id = l.session_id, _loop = true, _token = token }, Run)
    T.bind(l, sess)
  elseif err and (lost_error(err) or not l:alive()) then
    -- Nothing this hold can record: the next holder runs it when due.
    count(def.name, "lost", seconds)
    core.log("warn", "loop run lost its hold", { "loop", def.name, "cause", l._lost or describe(err) })
    return false
  end
  local cause = err and describe(err) or nil
  local ok2, next_in = pcall(record_end, l, def, cause)
  if not ok2 then
    count(def.name, "lost", seconds)
    if not U.outage("loop", next_in) then
      core.log("warn", "loop run not recorded", { "loop", def.name, "error", describe(next_in) })
    end
    return not lost_error(next_in)
  end
  count(def.name, cause and "failed" or "finished", seconds)
  if cause then
    core.log("warn", "loop run failed", { "loop", def.name, "attempt", attempt, "retry_in", next_in,
                                          "cause", cause:match("^[^\n]*") })
  else
    core.log("info", "loop run finished", { "loop", def.name, "seconds", string.format("%.3f", seconds) })
  end
  row.due_in = next_in
  return true
end

-- How long a standby waits between looks at the hold: an interval of the
-- loop, but no longer than the session's heartbeat interval, so that a
-- dead holder is replaced within about one interval of its session's end.
local STANDBY_MAX_S = 5

-- A loop's thread (host/worker.c): take the hold or stand by, run when
-- due, until the host drains ("stop": the hold is released), the code
-- changes ("reload": the hold stays with this session, and the new state
-- finds it) or the loop is gone from the script ("removed": released).
function M.serve_loop(result, name, _, generation)
  local def
  for _, d in ipairs(M.loops(result)) do
    if d.name == name then def = d end
  end
  local key = "loop:" .. name
  local sess, token, row -- the hold this thread has, and its row as last read
  local function let_go(why)
    if token and def and def._on_release then pcall(def._on_release) end
    if token then
      count(name, "standby")
      core.log("info", "loop hold let go", { "loop", name, "why", why })
    end
    sess, token, row = nil, nil, nil
  end
  if not def then
    -- Removed by a reload: the state that ran it is gone, so this one
    -- drops what a gauge of that name exported, and gives back a hold
    -- this session still has.
    require("bmdb.gauge").removed(name)
    local ok, s = pcall(core.session, 0)
    if ok then
      local got, t = pcall(T.transact_on, s, function(tx)
        local r = tx:query("SELECT token::TEXT AS token FROM loops WHERE name = $1 AND session_id = $2", name, s:id())[1]
        return r and r.token
      end)
      if got and t then release(s, { name = name }, t) end
    end
    return "removed"
  end
  math.randomseed(core.seed())
  while true do
    if core.state() ~= "running" then
      if token then release(sess, def, token) end
      let_go("the host is stopping")
      return "stop"
    end
    if core.generation() ~= generation then return "reload" end
    if token and not sess:alive() then let_go("session lost") end
    if not token then
      local ok, s = pcall(core.session, 1)
      if ok then
        local got, t, due_in, r, taken = pcall(look, s, def)
        if got and t then
          sess, token, row = s, t, r
          row.due_in = due_in
          row.read_at = core.now()
          count(name, "held")
          core.log("info", taken and "loop taken" or "loop hold kept", { "loop", name, "due_in",
                   string.format("%.1f", math.max(0, due_in)) })
        elseif not got and not U.outage("loop", t) then
          core.log("warn", "loop hold not looked at", { "loop", name, "error", describe(t) })
        else
          count(name, "standby")
        end
      end
      if not token then
        core.idle_wait(key, math.min(def.every, STANDBY_MAX_S) * (0.8 + 0.4 * math.random()))
      end
    else
      local wait = row.due_in - (core.now() - row.read_at)
      if wait > 0 then
        -- In short slices: a lost session is noticed, and let go, soon.
        core.idle_wait(key, math.min(wait, 1))
      elseif not run_once(def, sess, token, row) then
        let_go("the hold was lost")
      else
        row.read_at = core.now()
      end
    end
  end
end

return M
