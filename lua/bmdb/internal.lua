-- bmdb/internal.lua -- the implementation behind the `bmdb` module.
--
-- The C core (bmdb.core) does SQL, sessions and locks; this file holds the
-- policies: how a transaction is retried, what a work body's return or
-- error decides, how backoff grows, and the worker loop the host's slots
-- run (serve). lua/bmdb.lua exports the documented part; the rest (serve,
-- specs, workers, problems, claim, lock, run, describe, retry_seconds) is
-- for the host (lstate.c), bmdb.testing and the specs. It runs unchanged in
-- the binary (where it is embedded) and under busted (where bmdb.core is
-- build/bmdb/core.so).
--
-- Errors (docs/api.md, "Errors"): every failure is an error object with a kind.
-- Programming errors (kind usage, nested, closed, definition) and lost
-- fences (session_expired, lost, canceled), like sql and connection
-- failures, are raised. Outcomes a correct script must expect -- the pair
-- is held by someone else, or in backoff -- are raised by bmdb.work and
-- returned as nil, err by bmdb.try_work.
local core = require "bmdb.core"

local bmdb = {}

-- Raises an error object of kind with msg, prefixed with the position of
-- the code at `level` (as error()'s level: 1 is the function calling raise).
local function raise(kind, level, msg)
  local info = level > 0 and debug.getinfo(level + 1, "Sl")
  local at = info and info.currentline > 0 and (info.short_src .. ":" .. info.currentline .. ": ") or ""
  error(core.error(kind, at .. msg), 0)
end
bmdb.raise = raise

-- A bad argument, worded as luaL_argerror words it: "bad argument #2 to
-- 'work' (invalid process name ...)".
local function argerror(level, n, fname, msg)
  raise("usage", level + 1, "bad argument #" .. n .. " to '" .. fname .. "' (" .. msg .. ")")
end

local function is_error(v, kind)
  return core.is_error(v) and (kind == nil or v.kind == kind)
end
bmdb.is_error = is_error

-- The work item whose body is running in this state, if any: a transaction
-- inside a body belongs to the session that holds the item's lock, so it
-- fails once that session is gone even if the host already has a new one.
local current_work = nil

-- The session userdata each work item was locked under, out of the body's
-- reach (w.session_id is its id).
local handles = setmetatable({}, { __mode = "k" })
local function handle(w) return handles[w] end

local function session_for(work)
  if work then return handle(work) end
  return core.session()
end

-- How long transact keeps retrying before it raises, in seconds. Ordinary
-- contention (many slots claiming from the same candidates) can take
-- dozens of attempts; a bound by time rather than by a small count keeps
-- it from surfacing as a failure. Specs shorten it.
bmdb.retry_seconds = 30

-- The transaction open in this Lua state, if any. A second one opened while
-- it is open would be another connection of the same session: it would
-- wait forever on a row its own outer transaction wrote. So nesting is
-- refused, and bmdb.wake rides on the open transaction instead.
local open_tx = nil
-- Wake-ups asked for inside the open transaction, sent after it commits.
local after_commit = nil
-- What this state holds for the host while a commit function runs (its
-- place among the finishes, the claim turn, a place in a batch), as the
-- functions that let go of it, innermost last. A commit function that
-- yields in a coroutine never resumed would keep them for good, blocking
-- the host's claims or the batch; run_body lets go of them then.
local held = {}
local function hold(let_go) held[#held + 1] = let_go end
local function unhold() held[#held] = nil end
-- What a batch's member lets go of: the batch fails (its transaction's
-- state is unknown), or commits what it has without the closer's claim.
local function fail_batch() core.batch_leave(false, true) end
local function close_batch() core.batch_close(false) end

local function refuse_nested(what)
  if open_tx then
    raise("nested", 3, what .. ": a transaction is already open in this Lua state; " ..
      "use the tx you have (a second transaction would wait on the first one's locks)")
  end
end

-- What transact retries: serialization failures and deadlocks, and a lost
-- connection (on a fresh one), except when it was lost during COMMIT: the
-- transaction may have committed, and running fn again could do its work
-- twice, so that error goes to the caller unchanged.
local function retryable(err)
  if not is_error(err) then return false end
  if err.kind == "sql" then
    -- stale_statement: a statement this connection had prepared met a
    -- changed schema (a migration ran); prepared again, it runs.
    return err.sqlstate == "40001" or err.sqlstate == "40P01" or err.stale_statement == true
  end
  return err.kind == "connection" and err.outcome ~= "unknown"
end

local send_wake
local Work = {}

-- An item's own timeout is given up locally first, as a session's
-- deadline is (tx_commit): its local deadline was set before the claim
-- was sent, so it passes before the database's. Past it the item's
-- transactions commit nothing, whatever the database would still have
-- allowed for a few milliseconds. Returns the "lost" error, or nil.
local function past_deadline(w)
  if w._deadline and core.now() >= w._deadline then
    w._lost = w._lost or ("timeout after " .. w._timeout .. "s")
    return core.error("lost", "lost: the lock on " .. w.machine .. " " .. w.process ..
                      " was taken away: " .. w._lost)
  end
end

-- Runs fn(tx) in one fenced SERIALIZABLE transaction on sess, retrying
-- what retryable() allows with jittered backoff, for bmdb.retry_seconds.
-- on is a session, or a work item: then the fence also checks that the
-- item's lock is still this claim's (its token), and a "lost" error marks
-- the item lost for good.
local function transact_on(on, fn, ...)
  refuse_nested("bmdb.transact")
  local w = getmetatable(on) == Work and on or nil
  local sess = w and handle(w) or on
  local started = core.now()
  for attempt = 1, math.huge do
    local ok, tx
    if w then
      ok, tx = pcall(core.begin, sess, w.machine, w.process, w._token)
    else
      ok, tx = pcall(core.begin, sess)
    end
    local err, results, wakes = tx, nil, nil
    if ok then
      open_tx, after_commit = tx, {}
      results = { pcall(fn, tx, ...) }
      wakes = after_commit
      if open_tx == tx then open_tx, after_commit = nil, nil end
      ok, err = results[1], results[2]
      if ok and w then
        err = past_deadline(w)
        ok = not err
      end
      if ok then
        ok, err = pcall(tx.commit, tx)
      else
        tx:rollback()
      end
    end
    if ok then
      for _, process in ipairs(wakes) do pcall(send_wake, process) end
      return unpack(results, 2, table.maxn(results))
    end
    -- The item fence rides with the first statement (or the COMMIT), so
    -- a lock taken away is learned there, whichever statement it was.
    if w and is_error(err, "lost") and not w._lost then w._lost = err.message end
    local delay = -1
    if retryable(err) and core.now() - started < bmdb.retry_seconds then
      delay = core.retry_delay(attempt)
    end
    if delay < 0 then
      core.count("tx_failed")
      error(err, 0)
    end
    core.count("retry", is_error(err) and err.sqlstate or nil)
    -- Cut short by shutdown or the loss of sess: the next begin says which.
    core.sleep(delay, sess)
  end
end

function bmdb.transact(fn, ...)
  if type(fn) ~= "function" then argerror(2, 1, "transact", "function expected, got " .. type(fn)) end
  refuse_nested("bmdb.transact")
  return transact_on(current_work or core.session(), fn, ...)
end

local function finite(v)
  return type(v) == "number" and v == v and v ~= math.huge and v ~= -math.huge
end

-- Raises naming what is wrong with a backoff spec, argument n of fname: a
-- wrong type, or a field that is not a finite number (NaN would store
-- "nan" seconds, infinity never ends).
local function check_backoff_spec(spec, n, fname, level)
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
function bmdb.backoff_next(spec, last)
  if last ~= nil then
    if not finite(last) then
      argerror(2, 2, "backoff_next", "the last period must be a finite number of seconds, got " .. tostring(last))
    end
    last = math.max(1, math.ceil(last))
  end
  if spec == nil then return last or 1 end
  check_backoff_spec(spec, 1, "backoff_next", 1)
  if type(spec) == "number" then spec = { initial = spec } end
  local initial = math.max(1, math.ceil(spec.initial or 1))
  local maximum = math.max(initial, math.ceil(spec.maximum or initial))
  local exponent = math.max(1, spec.exponent or 1)
  if exponent <= 1 or last == nil then return initial end
  if last * exponent >= maximum then return maximum end
  return math.min(maximum, grow(last, exponent))
end

-- What a work item is: its machine, process, session_id and attempt. The
-- release acts on them, so a body can read them but not change them; they
-- live out of the body's reach, keyed by the item. So does the session
-- userdata the item was locked under (handles, below), which only this
-- file uses.
local fixed = setmetatable({}, { __mode = "k" })

Work.__index = function(w, k)
  local method = Work[k]
  if method ~= nil then return method end
  local f = fixed[w]
  return f and f[k]
end

Work.__newindex = function(w, k, v)
  local f = fixed[w]
  if f and f[k] ~= nil then
    raise("usage", 2, "w." .. tostring(k) .. " is read-only: the item's machine, process, session_id and " ..
          "attempt are fixed when it is locked")
  end
  rawset(w, k, v)
end

local function check_undecided(w, what)
  if w._decided then
    -- Deciding twice is a bug in the body: say so in the log too, since
    -- the body may swallow the error.
    core.log("warn", "work decided twice", { "session", w.session_id, "machine", w.machine,
      "process", w.process, "attempt", w.attempt, "decision", w._decided:lower(), "refused", what })
    raise("usage", 3, "w:" .. what .. ": the work item was already decided (" .. w._decided .. ")")
  end
end

-- One line per work event, fields in a fixed order.
local function log_event(w, event, extra)
  local kv = { "session", w.session_id, "machine", w.machine, "process", w.process, "attempt", w.attempt }
  local took = core.now() - w._started
  core.observe_work(w.process, event, w.machine, took) -- metrics, and this slot on the status page
  if event ~= "started" then
    kv[#kv + 1] = "duration"
    kv[#kv + 1] = string.format("%.3fs", took)
  end
  for _, pair in ipairs(extra or {}) do
    kv[#kv + 1], kv[#kv + 2] = pair[1], pair[2]
  end
  core.log(event == "failed" and "warn" or "info", "work " .. event, kv)
end

-- The item the calling slot's serve loop runs now ({w, def, generation},
-- and, once its finish also claimed, next), and the claim made in the
-- transaction of a batch of finishes (defined with the claims below).
local serving, claim_in_batch, may_claim_in_batch

-- A finish in the host's batch (host/batch.h): commit_fn runs at once,
-- its deferred statements queued aside; a statement it sends waits to
-- use the batch's transaction, in a savepoint of its own. Its release goes
-- out with the other members' at the batch's COMMIT. Returns true and
-- commit_fn's results once that committed; false when the item is to be
-- finished alone: there was no batch for it, or the batch failed and
-- nothing of it committed (with unknown: it may have; COMMIT got no
-- answer). commit_fn's own error undoes only its savepoint, and is raised
-- as a transaction of its own would have raised it; an error that the
-- transaction may not survive (what transact retries, a dead session)
-- fails the whole batch instead, and every member then finishes alone.
-- The member that closes the batch may also claim in it (claim_in_batch).
local function finish_in_batch(w, commit_fn)
  core.finish_enter()
  local joined, tx, failed = pcall(core.batch_join, handle(w))
  if not joined or not tx then
    core.finish_leave()
    if not joined then error(tx, 0) end -- the host is cancelling
    return false, nil, is_error(failed, "connection") and failed.outcome == "unknown"
  end
  hold(core.finish_leave)
  local r, wakes = { true }, {}
  if commit_fn then
    open_tx, after_commit = tx, wakes
    hold(fail_batch)
    r = { pcall(commit_fn, tx) }
    unhold()
    open_tx, after_commit = nil, nil
  end
  local ok, err = r[1], r[2]
  if ok then
    err = past_deadline(w)
    ok = not err
  end
  local fatal = not ok and (retryable(err) or is_error(err, "session_expired"))
  -- s: this finish ends the item of a serve loop that runs its next item
  -- after it, so the batch's claim may claim one for it (batch_leave).
  local s = ok and serving and serving.w == w and not serving.next and
            core.state() == "running" and core.generation() == serving.generation and serving or nil
  local may_claim = s and may_claim_in_batch(s.def)
  local committed, berr, whole, next =
    core.batch_leave(ok, fatal, w.machine, w.process, w._token, s ~= nil, may_claim)
  if committed == "claim" then committed, berr = claim_in_batch(w, tx, s, berr) end
  if next then s.next = next end -- handed by the closer's claim
  unhold()
  core.finish_leave()
  if committed then
    for _, process in ipairs(wakes) do pcall(send_wake, process) end
    return true, { unpack(r, 2, table.maxn(r)) }
  end
  -- (whole: the batch failed under commit_fn; its error may not be its own)
  if ok or fatal or whole then return false, nil, is_error(berr, "connection") and berr.outcome == "unknown" end
  if is_error(err, "lost") and not w._lost then w._lost = err.message end
  core.count("tx_failed")
  error(err, 0)
end

-- Records a decision. It must not be left unrecorded while the session
-- lives, or the lock stays held until the host exits: a lost connection
-- is tried again on a fresh one for as long as the session is alive (a
-- server restart costs a retry, not the item). A COMMIT whose answer was
-- lost may have landed; the next attempt tells, since a landed release
-- took our lock with it ("lost").
local function release(w, event, cause, spec, commit_fn)
  local seconds = 0
  local function decide(tx)
    if event == "Failed" then
      seconds = bmdb.backoff_next(spec, core.backoff_last(tx, w.machine, w.process))
    end
    -- commit_fn first: the release is the transaction's final statement,
    -- sent with COMMIT in one round trip (work.h).
    local r = commit_fn and { commit_fn(tx) }
    core.release(tx, w.machine, w.process, event, cause, seconds, w._token)
    if r then return unpack(r, 1, table.maxn(r)) end
  end
  local results, uncertain, attempt = nil, false, 0
  -- A finish of an item with a token (every claimed one) joins the batch
  -- (not from inside a transaction: finishing alone refuses that).
  if event == "Finished" and w._token and not open_tx then
    local ok, r, unknown = finish_in_batch(w, commit_fn)
    if ok then results = r end
    uncertain = unknown
  end
  while not results do
    -- Finishes run while no claim of this host does (slots.h).
    core.finish_enter()
    hold(core.finish_leave)
    local r = { pcall(transact_on, w, decide) }
    unhold()
    core.finish_leave()
    local err = r[2]
    if r[1] then
      results = { unpack(r, 2, table.maxn(r)) }
    elseif uncertain and is_error(err, "lost") then
      results = {} -- the earlier attempt committed; commit_fn's results went with it
    elseif is_error(err, "connection") and core.state() ~= "cancelling" and handle(w):alive() then
      uncertain = uncertain or err.outcome == "unknown"
      attempt = attempt + 1
      core.sleep(math.min(1, 0.05 * 2 ^ attempt), handle(w))
    else
      error(err, 0)
    end
  end
  -- The release may have made machines eligible for other processes: wake
  -- idle slots everywhere, once the commit is visible. The host folds a
  -- burst of these into one NOTIFY (slots.h).
  core.wake_fleet()
  local extra = { { "result", event:lower() } }
  if event == "Failed" then
    extra[2] = { "backoff", seconds .. "s" }
    extra[3] = { "cause", (cause or ""):match("^[^\n]*") }
  end
  log_event(w, event:lower(), extra)
  return unpack(results, 1, table.maxn(results))
end

-- Releases the lock, clears backoff and records Finished; commit_fn(tx)
-- runs in the same transaction, so its writes commit with the release.
function Work:finish(commit_fn)
  check_undecided(self, "finish")
  if commit_fn ~= nil and type(commit_fn) ~= "function" then
    argerror(2, 1, "finish", "function or nil expected, got " .. type(commit_fn))
  end
  local r = { release(self, "Finished", nil, nil, commit_fn) }
  self._decided = "Finished"
  return unpack(r, 1, table.maxn(r))
end

-- Releases the lock, records Failed with cause and sets backoff (the spec
-- given, else the worker's, else the previous period).
function Work:fail(cause, backoff)
  check_undecided(self, "fail")
  check_backoff_spec(backoff, 2, "fail", 1)
  release(self, "Failed", cause ~= nil and bmdb.describe(cause) or "failed", backoff or self._backoff)
  self._decided = "Failed"
end

function Work:cancel()
  check_undecided(self, "cancel")
  release(self, "Canceled", "canceled")
  self._decided = "Canceled"
end

-- False once the lock is lost: decided, the host cancelling, the session
-- gone, or the lock taken away (its timeout passed, an operator canceled
-- it, another claim took it over).
function Work:alive()
  if self._decided or self._lost or core.state() == "cancelling" or not handle(self):alive() then
    return false
  end
  if self._deadline and core.now() >= self._deadline then
    self._lost = "timeout after " .. self._timeout .. "s"
  elseif self._token then
    self._lost = core.item_lost(self._token)
  end
  return not self._lost
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
function bmdb.describe(v)
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

-- A body's error for its cause: an error object keeps itself and gets its
-- traceback as a field (the C message handler does the same); anything
-- else becomes its description followed by the traceback.
local function traceback(err)
  if is_error(err) then
    if rawget(err, "traceback") == nil then err.traceback = debug.traceback("", 2):gsub("^\n", "") end
    return err
  end
  return debug.traceback(bmdb.describe(err), 2)
end

-- What a body's failure decides: cancellation and a lost session cannot be
-- recorded by this session; anything else is a failure with backoff.
local function settle_failure(w, err, msg)
  if w._decided then return end
  if is_error(err, "canceled") or is_error(err, "session_expired") or is_error(err, "lost")
     or not w:alive() then
    -- Nothing this session can record any more: at shutdown the host
    -- records Canceled for every lock it still holds; a lost lock is
    -- recorded Abandoned by whoever collects or takes it over.
    if not pcall(w.cancel, w) then
      local shutdown = core.state() == "cancelling"
      w._decided = shutdown and "Canceled" or "Lost"
      local why = w._lost or (is_error(err, "lost") and err.message) or "session expired"
      log_event(w, shutdown and "canceled" or "lost", {
        { "result", shutdown and "canceled" or "lost" },
        { "cause", shutdown and "host shutdown" or why } })
    end
    return
  end
  local ok, ferr = pcall(w.fail, w, msg)
  if not ok then
    log_event(w, "failed", { { "result", "unrecorded" }, { "cause", tostring(ferr):match("^[^\n]*") } })
  end
end

-- Locks (machine, process) for the current session, in one transaction.
-- Returns the work item, or nil and an error object of kind "held" or
-- "backoff" (with backoff_until) when it cannot. fname and level name the
-- public call for argument errors.
function bmdb.lock(machine, process, opts, fname, level)
  fname, level = fname or "lock", level or 1
  if not core.valid_uuid(machine) then
    argerror(level + 1, 1, fname, "machine id is not a UUID: " .. tostring(machine))
  end
  if not core.valid_process(process) then
    argerror(level + 1, 2, fname, "invalid process name " .. string.format("%q", tostring(process)) ..
             " (a letter, then letters, digits or _, at most 63 characters)")
  end
  local timeout = opts and opts.timeout
  if timeout ~= nil and not (finite(timeout) and timeout > 0) then
    argerror(level + 1, 4, fname, "timeout must be a number of seconds above 0, got " .. tostring(timeout))
  end
  local sess = core.session()
  local started = core.now()
  local status, detail, token = transact_on(sess, function(tx)
    return core.lock(tx, machine, process, bmdb.claim_opts(opts and opts.backoff, timeout))
  end)
  if status == "held" then
    return nil, core.error("held", "machine " .. machine .. " is already held for " .. process)
  elseif status == "paused" or status == "onhold" then
    local e = core.error("held", status == "paused"
      and "process " .. process .. " is paused" .. (detail ~= "" and ": " .. detail or "")
      or "machine " .. machine .. " is on hold" .. (detail ~= "" and ": " .. detail or ""))
    e.reason = status
    return nil, e
  elseif status == "backoff" then
    local e = core.error("backoff", "machine " .. machine .. " is in backoff for " .. process ..
                         " until " .. detail)
    e.backoff_until = detail
    return nil, e
  end
  return bmdb.new_work(sess, machine, process, detail, opts and opts.backoff, token, timeout, started)
end

-- What a claim stores in its work row: the timeout, and the backoff spec
-- normalized by backoff_next's rules, which whoever records the item's
-- death (a takeover, a collection) applies in SQL.
function bmdb.claim_opts(spec, timeout)
  local o = { timeout = timeout }
  if type(spec) == "number" then spec = { initial = spec } end
  if type(spec) == "table" then
    o.initial = math.max(1, math.ceil(spec.initial or 1))
    o.maximum = math.max(o.initial, math.ceil(spec.maximum or o.initial))
    o.exponent = math.max(1, spec.exponent or 1)
  end
  return o
end

-- started: core.now() before the claim was sent, so the local deadline
-- passes before the database's.
function bmdb.new_work(sess, machine, process, attempt, backoff, token, timeout, started)
  local w = setmetatable({ _backoff = backoff, _decided = false, _started = core.now(), _token = token,
                           _timeout = timeout, _deadline = timeout and (started or core.now()) + timeout }, Work)
  fixed[w] = { machine = machine, process = process, session_id = sess:id(), attempt = attempt }
  handles[w] = sess
  log_event(w, "started")
  return w
end

-- Runs body(w) on a claimed item and settles it: return = finish (unless
-- the body decided), raise = fail with the error and traceback as cause.
local function run_body(w, body)
  local outer, outer_tx, depth = current_work, open_tx, #held
  current_work = w
  if w._token then
    core.track(w._token, w.machine, w.process, bmdb.slot_index or 0, w._timeout or 0,
               w._deadline and w._deadline - w._timeout)
  end
  local results = { xpcall(body, traceback, w) }
  current_work = outer
  if open_tx ~= outer_tx then
    -- A coroutine yielded inside a transaction and was never resumed: its
    -- transaction would hold its locks (and its connection) for good.
    local tx = open_tx
    open_tx, after_commit = outer_tx, nil
    pcall(tx.rollback, tx) -- (refused for a batch's: the batch fails below)
    for i = #held, depth + 1, -1 do
      pcall(held[i])
      held[i] = nil
    end
    core.log("warn", "rolled back a transaction the body left open (a coroutine yielded inside it)",
             { "machine", w.machine, "process", w.process })
  end
  if results[1] then
    if not w._decided then
      local ok, err = pcall(w.finish, w)
      if not ok then
        settle_failure(w, err, bmdb.describe(err))
        error(err, 0)
      end
    end
    return unpack(results, 2, table.maxn(results))
  end
  local err = results[2]
  settle_failure(w, err, bmdb.describe(err))
  error(err, 0)
end
-- The item stays tracked while it is settled: a cancel notified meanwhile
-- still marks it lost.
-- Then what the body left to the item's end (bmdb.at_item_end) runs,
-- last registered first: the item is untracked, so no lost hook cuts it.
function bmdb.run(w, body)
  local r = { pcall(run_body, w, body) }
  if w._token then core.untrack(w._token) end
  local at_end = w._at_end
  w._at_end = nil
  for i = #(at_end or {}), 1, -1 do
    local ok, err = pcall(at_end[i])
    if not ok then
      core.log("warn", "cleanup at the end of an item failed",
               { "machine", w.machine, "process", w.process, "error", bmdb.describe(err) })
    end
  end
  if not r[1] then error(r[2], 0) end
  return unpack(r, 2, table.maxn(r))
end

function bmdb.work(machine, process, body, opts)
  if type(body) ~= "function" then argerror(2, 3, "work", "function expected, got " .. type(body)) end
  local w, err = bmdb.lock(machine, process, opts, "work", 2)
  if not w then error(err, 2) end
  return bmdb.run(w, body)
end

-- bmdb.work, but a pair held by someone else or in backoff is an outcome,
-- not an error: nil and the error object come back instead.
function bmdb.try_work(machine, process, body, opts)
  if type(body) ~= "function" then argerror(2, 3, "try_work", "function expected, got " .. type(body)) end
  local w, err = bmdb.lock(machine, process, opts, "try_work", 2)
  if not w then return nil, err end
  return bmdb.run(w, body)
end

-- fn() runs once the running item has ended, however it ended (for
-- what a module holds on the item's behalf, such as bmdb.limit's
-- places). False outside work: nothing is registered.
function bmdb.at_item_end(fn)
  local w = current_work
  if not w then return false end
  local t = w._at_end or {}
  t[#t + 1] = fn
  w._at_end = t
  return true
end

function bmdb.session()
  local s = session_for(current_work)
  return { id = s:id(), component = s:component(), alive = s:alive() }
end

-- The session that the running code's host-owned I/O and sleeps are
-- fenced by (host/iofence.h): the current item's, none outside work.
function bmdb.io_session()
  return current_work and handle(current_work) or nil
end

-- Sleeps, but not past shutdown or the loss of the session in use.
function bmdb.sleep(seconds)
  if not finite(seconds) or seconds < 0 then
    argerror(2, 1, "sleep", "expected a finite number of seconds >= 0, got " .. tostring(seconds))
  end
  if core.sleep(seconds, bmdb.io_session()) then return end
  if core.state() == "cancelling" then
    raise("canceled", 2, "canceled: the host is shutting down")
  end
  raise("session_expired", 2, "session expired")
end

bmdb.log = {}
for _, level in ipairs { "debug", "info", "warn", "error" } do
  bmdb.log[level] = function(msg, fields)
    local kv = {}
    if type(fields) == "table" then
      local keys = {}
      for k in pairs(fields) do keys[#keys + 1] = tostring(k) end
      table.sort(keys)
      for _, k in ipairs(keys) do
        kv[#kv + 1], kv[#kv + 2] = k, fields[k]
      end
    end
    core.log(level, tostring(msg), kv)
  end
end

-- Sends one wake-up in a transaction of its own. A server without
-- notifications (CockroachDB) says so: slots poll instead.
send_wake = function(process)
  local ok, err = pcall(transact_on, session_for(current_work), function(tx)
    tx:exec("SELECT pg_notify('bmdb_wake', $1)", process)
  end)
  if not ok and not (is_error(err, "sql") and (err.sqlstate == "42883" or err.sqlstate == "0A000")) then
    error(err, 0)
  end
  return ok
end

-- Wakes idle slots of a process on every host. Inside a transaction it
-- rides on that transaction (NOTIFY is sent at commit, and not at all if
-- it rolls back); when this host has not seen the server take LISTEN, the
-- wake-up is sent right after the commit instead, so a server without
-- notifications cannot abort the transaction.
function bmdb.wake(process)
  if not core.valid_process(process) then
    argerror(2, 1, "wake", "invalid process name " .. string.format("%q", tostring(process)))
  end
  if open_tx then
    if core.notify_enabled() then
      open_tx:exec("SELECT pg_notify('bmdb_wake', $1)", process)
    else
      after_commit[#after_commit + 1] = process
    end
    return true
  end
  local ok, err = pcall(send_wake, process)
  if not ok then error(err, 2) end
  return err
end

-- ------------------------------------------------------------ work control

-- Sends a notification after a commit; a server without them
-- (CockroachDB) refuses, and the holders learn at their next bmdb call.
local function notify_after(channel, payload)
  pcall(transact_on, session_for(current_work), function(tx)
    tx:exec("SELECT pg_notify($1, $2)", channel, payload)
  end)
end

local function control(op, name, reason, fname)
  refuse_nested("bmdb." .. fname)
  if reason ~= nil and type(reason) ~= "string" then
    argerror(3, 2, fname, "reason must be a string, got " .. type(reason))
  end
  local ok, r = pcall(transact_on, session_for(current_work), function(tx)
    return core.control(tx, op, name, reason)
  end)
  if not ok then error(r, 3) end
  if r and (op == "resume" or op == "unhold") then notify_after("bmdb_wake", op == "resume" and name or "") end
  return r
end

-- Ends the lock on (machine, process) now, recorded Canceled with the
-- reason; its holder's body is interrupted and commits nothing. True when
-- a lock was canceled, false when none was held.
function bmdb.cancel(machine, process, reason)
  refuse_nested("bmdb.cancel")
  if not core.valid_uuid(machine) then argerror(2, 1, "cancel", "machine id is not a UUID: " .. tostring(machine)) end
  if not core.valid_process(process) then
    argerror(2, 2, "cancel", "invalid process name " .. string.format("%q", tostring(process)))
  end
  if reason ~= nil and type(reason) ~= "string" then
    argerror(2, 3, "cancel", "reason must be a string, got " .. type(reason))
  end
  local ok, token = pcall(transact_on, session_for(current_work), function(tx)
    return core.cancel(tx, machine, process, reason)
  end)
  if not ok then error(token, 2) end
  if not token then return false end
  notify_after("bmdb_cancel", token)
  notify_after("bmdb_wake", process)
  return true
end

-- Fleet-wide: no claim of process succeeds until it is resumed.
function bmdb.pause(process, reason) return control("pause", process, reason, "pause") end
-- True when it was paused.
function bmdb.resume(process) return control("resume", process, nil, "resume") end
-- No process claims machine until it is released; both are recorded in
-- its history with the reason.
function bmdb.hold(machine, reason) return control("hold", machine, reason, "hold") end
-- True when it was on hold.
function bmdb.unhold(machine, reason) return control("unhold", machine, reason, "unhold") end

-- os.exit in a body stops the host (lstate.c); the item that called it
-- counts as failed, with its worker's backoff, so a body that exits its
-- host on every try backs off instead of stopping host after host.
if core.is_os_exit(os.exit) then
  local host_exit = os.exit
  os.exit = function(status, ...)
    local w = current_work
    if w and not w._decided and w:alive() then
      pcall(w.fail, w, "the body called os.exit(" .. tostring(status) .. ")")
    end
    return host_exit(status, ...)
  end
end

-- ------------------------------------------------------------------ workers

local Worker = {}
Worker.__index = Worker

local function check_backoff(spec, where)
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

local known_fields = { process = true, concurrency = true, backoff = true, select = true, run = true,
                       poll = true, batch = true, timeout = true, ahead = true }

-- The most items a worker may hold claimed ahead of its slots (a host's
-- queue of handed items holds SLOT_HAND_MAX, 64, per process).
local AHEAD_MAX = 32
-- The most items one claim locks: what the host reads back and hands out
-- of a claim (core.claim_max, a batch's BATCH_MAX, 64); a lock of more
-- would leave the rest locked to no slot until the stray sweep.
local CLAIM_MAX = core.claim_max
-- Candidates a select is asked for by default: 16, or as many as the
-- claim locks when it locks more (several slots, or items claimed ahead).
local BATCH_DEFAULT = 16
-- The limit a claim that locks up to k items passes to select.
local function select_limit(def, k)
  return def.batch_auto and math.max(def.batch, k) or def.batch
end

-- A worker that does not set `ahead` claims ahead only while its items
-- are short: as many items as its slots are expected to start within
-- AHEAD_WITHIN seconds, judged by how long this slot's recent items took
-- (a moving average), once it has timed AHEAD_AUTO_AFTER of them, and no
-- more than one claim holds (CLAIM_MAX, with what waits already). An
-- item's lock, Started row and timeout begin at its claim, so what
-- claiming ahead changes for an item is bounded by that wait; bare-metal
-- items of minutes are never claimed ahead, and short ones save a select
-- and a lock per item (BENCHMARKS.md: the select's cost is mostly per
-- call, so claims of up to 64 ran c=4 1.2-1.3x faster than of 16).
local AHEAD_AUTO = CLAIM_MAX
local AHEAD_WITHIN = 0.01
local AHEAD_AUTO_AFTER = 8
-- Claims of several hosts that read the same candidates meet: the later
-- one's lock waits for the earlier's COMMIT, then fails to serialize and
-- runs again, and a claim of many items meets others more often and makes
-- them wait longer (3 hosts x 4 slots ran at 0.3 to 0.6 times the rate
-- without claiming ahead). So after a conflict (a claim ran again) a
-- worker's slot claims ahead by default only after AHEAD_PAUSE more
-- claims; a further conflict starts the count again, so several hosts
-- that keep meeting do not claim ahead, and a host alone always may.
local AHEAD_PAUSE = 256
local function contended(def) def.ahead_pause = AHEAD_PAUSE end

-- Validates a definition; returns the problems found (empty when valid).
function bmdb.problems(def)
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
  local ok, err = pcall(check_backoff, def.backoff, where)
  if not ok then bad(err) end
  for k in pairs(def) do
    if not known_fields[k] then bad(where .. "unknown field '" .. tostring(k) .. "'") end
  end
  return problems
end

-- bmdb.worker{process=, concurrency=, backoff=, select=, run=, poll=, batch=,
-- timeout=, ahead=}
function bmdb.worker(def)
  local problems = bmdb.problems(def)
  if #problems > 0 then raise("definition", 2, table.concat(problems, "; ")) end
  local w = {}
  for k, v in pairs(def) do w[k] = v end
  w.concurrency = w.concurrency or 1
  w.poll = w.poll or 1
  w.batch_auto = w.batch == nil
  w.batch = w.batch or BATCH_DEFAULT
  w.ahead_auto = w.ahead == nil
  w.ahead = w.ahead or AHEAD_AUTO
  return setmetatable(w, Worker)
end

-- The workers a script returned: a list of bmdb.worker definitions (or one
-- alone). nil for a one-off; raises naming every problem found.
function bmdb.workers(result)
  if result == nil then return nil end
  if getmetatable(result) == Worker then result = { result } end
  if type(result) ~= "table" then return nil end
  local list, problems, seen = {}, {}, {}
  for i, def in ipairs(result) do
    if getmetatable(def) ~= Worker then
      problems[#problems + 1] = "returned value #" .. i .. " is not a bmdb.worker{...} definition"
    elseif seen[def.process] then
      problems[#problems + 1] = "two workers have process " .. def.process
    else
      seen[def.process] = true
      list[#list + 1] = def
    end
  end
  if #problems > 0 then raise("definition", 0, table.concat(problems, "; ")) end
  if #list == 0 then return nil end
  return list
end

function bmdb.specs(result)
  local list = bmdb.workers(result)
  if not list then return nil end
  local specs = {}
  for i, def in ipairs(list) do specs[i] = { process = def.process, concurrency = def.concurrency } end
  return specs
end

local function shuffle(t)
  for i = #t, 2, -1 do
    local j = math.random(i)
    t[i], t[j] = t[j], t[i]
  end
end

-- Reads whether def's process is paused, for the host to log once per
-- change; true when it is. Read on an idle select, which cannot tell a
-- pause from no work (the host logs a pause once it learns of it, work or
-- not); a claim that locks nothing learns it in the full claim instead.
local function read_pause(tx, def)
  local why = core.paused(tx, def.process)
  core.note_pause(def.process, why ~= nil, why)
  return why ~= nil
end

-- A process this host last saw paused: read the pause alone, not select
-- (a select may be heavy, and a pause is often asked for to quiet the
-- database), until a read finds it resumed. True while it stays paused.
local function still_paused(tx, def)
  return core.seen_paused(def.process) and read_pause(tx, def)
end

-- select's rows as machine ids; nil when they are not a list of rows or
-- ids that are machine ids (the full claim then says what is wrong).
local function candidate_ids(rows)
  if type(rows) ~= "table" then return nil end
  local ids = {}
  for i, r in ipairs(rows) do
    local id = type(r) == "table" and r.machine_id or r
    if type(id) ~= "string" or not core.valid_uuid(id) then return nil end
    ids[i] = id
  end
  return ids
end

-- What a committed claim that locked something (core.claimed) settles:
-- the process is not paused, and each item counts as a claim.
local function note_claimed(def, n)
  core.note_pause(def.process, false)
  for _ = 1, n do core.count("claim") end
end

-- The usual claim in two round trips: BEGIN, the fence and the select's
-- statement in one; the lock of up to k free candidates (in random order)
-- with COMMIT in the other (core.lock_any). Returns true and the list of
-- {machine, attempt, token} it locked (empty when select found nothing),
-- or false when the full claim below must decide: no candidate was free
-- in our snapshot, select returned something that is not a machine id,
-- or the lock failed (a machine that does not exist). A drain that begins
-- while we select wins. A process last seen paused reads only the pause.
local function claim_fast(def, sess, k)
  local sent, attempts = nil, 0
  local ok, outcome = pcall(transact_on, sess, function(tx)
    sent = nil
    attempts = attempts + 1
    -- a retry: another host's claim or finish met ours (claim_size)
    if attempts == 2 then contended(def) end
    if still_paused(tx, def) then return "idle" end
    local ids = candidate_ids(def.select(tx, select_limit(def, k)))
    if not ids then return "full" end
    if #ids == 0 then
      read_pause(tx, def)
      return "idle"
    end
    shuffle(ids)
    if core.state() ~= "running" then raise("draining", 0, "draining: no new claims") end
    core.lock_any(tx, ids, def.process, def.claim_opts, k)
    sent = tx
    return "sent"
  end)
  if not ok then
    if is_error(outcome, "sql") and outcome.sqlstate == "23503" then return false end
    error(outcome, 0)
  end
  if outcome == "idle" then return true, {} end
  if outcome ~= "sent" then return false end
  local locked = core.claimed(sent)
  if #locked == 0 then return false end
  note_claimed(def, #locked)
  return true, locked
end

-- The full claim: selects candidates and locks one, in one transaction,
-- learning why a candidate cannot be locked and taking over the locks of
-- ended sessions. Candidates are
-- tried in random order so slots that read the same candidates spread
-- over them instead of colliding on the first. opts (bmdb.testing):
-- ordered = keep select's order; machine = only that candidate.
--
-- A candidate that is not a machine id, or names no machine, is skipped
-- with a warning: one bad row from select must not stop the worker. Ids
-- are checked before locking; whether a machine exists is only learned
-- when the lock's INSERT fails (23503, which aborts the transaction), so
-- the claim then runs again and checks that id first. A correct select
-- pays nothing for this.
local function claim(def, opts)
  local sess = core.session(1)
  local suspects, warned = {}, {}
  local function skip(id, why)
    if warned[id] then return end
    warned[id] = true
    core.log("warn", "claim skipped a candidate", { "process", def.process,
      "candidate", type(id) == "string" and id or bmdb.describe(id), "reason", why })
  end
  for _ = 1, def.batch + 1 do
    local trying
    local started = core.now()
    local ok, machine, attempt, token = pcall(transact_on, sess, function(tx)
      local rows = def.select(tx, def.batch)
      if type(rows) ~= "table" then
        raise("usage", 0, "worker " .. def.process .. ": select must return a list of rows, got " .. type(rows))
      end
      local ids = {}
      for _, r in ipairs(rows) do
        local id = type(r) == "table" and r.machine_id or r
        if not (opts and opts.machine) or id == opts.machine then ids[#ids + 1] = id end
      end
      if not (opts and opts.ordered) then shuffle(ids) end
      if #ids == 0 then read_pause(tx, def) end
      for _, id in ipairs(ids) do
        if type(id) ~= "string" or not core.valid_uuid(id) then
          skip(id, "not a machine id (a UUID)")
        elseif suspects[id] and not tx:one("SELECT 1 AS x FROM machines WHERE machine_id = $1", id) then
          skip(id, "no such machine")
        else
          trying = id
          local status, a, t = core.lock(tx, id, def.process, def.claim_opts)
          trying = nil
          if status == "locked" then
            -- A drain that began while we selected wins: roll the claim back.
            -- A select that starts after the drain always sees it here.
            if core.state() ~= "running" then raise("draining", 0, "draining: no new claims") end
            core.note_pause(def.process, false)
            return id, a, t
          elseif status == "paused" then
            core.note_pause(def.process, true, a)
            return nil
          end
        end
      end
    end)
    if ok then
      if machine then
        core.count("claim")
        return bmdb.new_work(sess, machine, def.process, attempt, def.backoff, token, def.timeout, started)
      end
      return nil
    end
    local err = machine
    if not (trying and not suspects[trying] and is_error(err, "sql") and err.sqlstate == "23503") then
      error(err, 0)
    end
    suspects[trying] = true
  end
  raise("claim", 0, "worker " .. def.process .. ": too many candidates failed to lock")
end

-- A claim in the host's turn (slots.h: claims run alone, and claim for
-- every slot of the process that waits to). Returns the work item for
-- this slot, or nil.
local function adopt(def, machine, attempt, token, session_id, started)
  local sess = core.session(1)
  -- A lock taken under a session that has since been lost is not ours.
  if sess:id() ~= session_id then return nil end
  -- Nor one whose timeout passed while it waited (claimed ahead): its
  -- body must not start, and the row is the timeout's to record. (A
  -- cancel while it waits is learned as for any item: the body's first
  -- transaction finds its lock gone. One that waits long is given back
  -- before that: slots.h, SLOT_GIVE_BACK_S.)
  if def.timeout and core.now() >= started + def.timeout then
    core.log("info", "claimed item not started: its timeout passed while it waited",
             { "session", session_id, "machine", machine, "process", def.process, "timeout", def.timeout })
    return nil
  end
  return bmdb.new_work(sess, machine, def.process, attempt, def.backoff, token, def.timeout, started)
end

-- An item claimed for a slot that turned out not to be there: let go.
local function let_go(def, sess, l)
  pcall(transact_on, sess, function(tx)
    core.release(tx, l[1], def.process, "Canceled", "claimed for a slot that was not there", 1, l[3])
  end)
end

-- A claim for several slots keeps the first item it locked and hands
-- the others to the slots of its process that wait (core.claim_hand).
local function hand_out(def, sess, locked, started)
  for i = 2, #locked do
    local l = locked[i]
    -- No room to hand it (more than SLOT_HAND_MAX): let it go.
    if not core.claim_hand(def.process, l[1], l[2], l[3], sess:id(), started) then let_go(def, sess, l) end
  end
end

-- Items claimed ahead for def's worker that wait in the host's queue of
-- handed items (none with `ahead = 0`, and then the host is not asked).
local function waiting_ahead(def)
  return def.ahead > 0 and core.claim_queued(def.process) or 0
end

-- How many items a claim for `needed` slots locks, `waiting` items being
-- queued already: also as many as the worker holds ahead (def.ahead, or
-- by default what its recent items allow) beyond those, up to the
-- worker's `batch` when it sets one, and never more than CLAIM_MAX (so
-- what is claimed and what waits fit the host's queue). The items beyond the slots' need wait
-- in the queue, each slot taking the oldest when it comes back for its
-- next, so a worker of short items selects and locks once for several of
-- them instead of once per batch of finishes.
local function claim_size(def, needed, waiting)
  local ahead = def.ahead
  if def.ahead_auto then
    local t = def.item_seconds
    local pause = def.ahead_pause or 0
    if pause > 0 then def.ahead_pause = pause - 1 end
    if pause > 0 or (def.items_timed or 0) < AHEAD_AUTO_AFTER then ahead = 0
    -- the k-th item waiting starts after about k * t / concurrency
    else ahead = math.min(AHEAD_AUTO - needed, math.floor(AHEAD_WITHIN * def.concurrency / math.max(t, 1e-6))) end
  end
  local most = def.batch_auto and CLAIM_MAX or math.min(def.batch, CLAIM_MAX)
  return math.min(most, needed + math.max(0, ahead - waiting))
end

-- How long one of this slot's items took, body and finish, for a worker
-- that claims ahead by default (claim_size): a moving average over about
-- the last eight.
local function time_item(def, seconds)
  def.items_timed = (def.items_timed or 0) + 1
  local t = def.item_seconds
  def.item_seconds = t and t + (seconds - t) / 8 or seconds
end

local function claim_as_claimer(def, opts)
  if opts then return claim(def, opts) end
  local sess = core.session(1)
  local started = core.now()
  local k = claim_size(def, 1 + core.claim_waiters(def.process), waiting_ahead(def))
  local settled, locked = claim_fast(def, sess, k)
  if not settled then return claim(def) end
  if #locked == 0 then return nil end
  hand_out(def, sess, locked, started)
  local l = locked[1]
  return bmdb.new_work(sess, l[1], def.process, l[2], def.backoff, l[3], def.timeout, started)
end

local function claim_in_turn(def, opts, generation)
  while true do
    local got, machine, attempt, token, session_id, started = core.claim_enter(def.process, 0.5)
    if got == "turn" then
      -- The wait for the turn can be long enough for a reload or a drain
      -- to begin: then this slot claims nothing on the old code.
      if core.state() == "running" and (not generation or core.generation() == generation) then break end
      core.claim_leave()
      return nil
    end
    if got == "handed" then
      local w = adopt(def, machine, attempt, token, session_id, started)
      if w then return w end
    elseif core.state() ~= "running" then
      return nil
    end
  end
  local r = { pcall(claim_as_claimer, def, opts) }
  core.claim_leave()
  if not r[1] then error(r[2], 0) end
  return r[2]
end
bmdb.claim = claim_in_turn

-- Whether a slot of def's worker that closes a batch may claim in it.
-- Not after three failed claims there in a row (claim_in_batch). And a
-- conflict fails a batch that claims whole, every member's finish with
-- it, where a claim in turn fails alone: so after one, a slot claims in
-- turn for its next BATCH_CLAIM_PAUSE batches. With one host there are
-- none, and with several the claims in batches stay the rarer ones.
local BATCH_CLAIM_PAUSE = 32
local function conflict(err)
  return is_error(err, "sql") and (err.sqlstate == "40001" or err.sqlstate == "40P01")
end
may_claim_in_batch = function(def)
  if (def.batch_claim_failures or 0) >= 3 then return false end
  local pause = def.batch_claim_pause or 0
  if pause == 0 then return true end
  def.batch_claim_pause = pause - 1
  return false
end

-- select, and the lock of up to k of its candidates as tx's final
-- statement; true when that lock was set.
local function select_and_lock(def, tx, k)
  if still_paused(tx, def) then return false end
  local ids = candidate_ids(def.select(tx, select_limit(def, k)))
  if not ids or #ids == 0 or core.state() ~= "running" then return false end
  shuffle(ids)
  core.lock_any(tx, ids, def.process, def.claim_opts, k)
  return true
end

-- The claim of the slot that closes a batch of finishes, in the batch's
-- transaction (core.batch_leave answered "claim": the batch's members
-- are the host's only finishes in flight, and this slot holds the claim
-- turn). It claims for itself, for the batch's members of its worker
-- (peers: they claim next) and for the slots that wait, as a claim in
-- turn would; the releases ride with the select's statement and the lock
-- with COMMIT. So items end and the next are claimed in one transaction,
-- the steady state DESIGN asks for; at one slot that is every item, three
-- round trips for both. A lost session or lock, or any failure, commits
-- neither the releases nor the claim (the members then finish alone). A
-- select that fails, or offers a machine that does not exist, costs the
-- batch; after three such failures in a row this slot's worker claims
-- only in turn, where the full claim says what is wrong. What it claimed
-- for itself becomes s.next, which the serve loop runs next.
claim_in_batch = function(w, tx, s, peers)
  hold(close_batch) -- (which lets the claim turn go too)
  local def = s.def
  local started = core.now()
  local needed = peers + core.claim_waiters(def.process)
  local ok, sent = true, false
  -- Items claimed ahead that cover every slot of this claim: the batch
  -- only commits its releases, and the slots take those items next.
  local waiting = waiting_ahead(def)
  if waiting < needed then
    open_tx = tx
    ok, sent = pcall(select_and_lock, def, tx, claim_size(def, needed, waiting))
    open_tx = nil
  end
  unhold()
  -- The batch's members and the waiting slots are handed their items
  -- there; what is left is this slot's, and what fitted nowhere.
  local committed, err, locked, handed = core.batch_close(ok and sent, started)
  if committed and #locked > 0 then
    note_claimed(def, #locked + handed)
    s.next = { locked[1][1], locked[1][2], locked[1][3], w.session_id, started }
    for i = 2, #locked do let_go(def, handle(w), locked[i]) end
  end
  if conflict(not ok and sent) or conflict(not committed and err) then
    -- Another host's claim or finish met this one (at the select, or at
    -- COMMIT): a conflict now costs the whole batch, so claim in turn for
    -- a while, and for longer without claiming ahead.
    def.batch_claim_pause = BATCH_CLAIM_PAUSE
    contended(def)
  elseif not ok and type(sent) == "table" and sent.deferred then
    -- A member's deferred statement failed in the select's flight: the
    -- member's failure (it finishes alone, and raises it), not the claim's.
  elseif ok and not (sent and is_error(err, "sql") and err.sqlstate == "23503") then
    def.batch_claim_failures = 0
  else
    def.batch_claim_failures = (def.batch_claim_failures or 0) + 1
    if def.batch_claim_failures == 3 then
      core.log("warn", "claims in a batch's transaction failed three times; this slot claims in turn",
               { "process", def.process, "error", bmdb.describe(ok and err or sent) })
    end
  end
  return committed, err
end

-- An item a claimer handed to this process's slots that none took (they
-- stopped waiting: a drain or a reload began): this slot runs it before
-- it leaves the loop, as it would an item it had claimed itself.
local function take_handed(def)
  while true do
    local machine, attempt, token, session_id, started = core.claim_take(def.process)
    if not machine then return nil end
    local w = adopt(def, machine, attempt, token, session_id, started)
    if w then return w end
  end
end

-- One slot's loop: claim, run, decide, until the host drains ("stop"), the
-- code changes ("reload") or this slot's worker is gone ("removed").
function bmdb.serve(result, process, index, generation)
  local def
  for _, d in ipairs(bmdb.workers(result) or {}) do
    if d.process == process then def = d end
  end
  if not def or index > def.concurrency then return "removed" end
  def.claim_opts = bmdb.claim_opts(def.backoff, def.timeout)
  -- What this worker claimed ahead by default is given back when it has
  -- waited long (slots.h, SLOT_GIVE_BACK_S); what it asked for, it keeps.
  core.claim_give_back(def.process, def.ahead_auto)
  bmdb.slot_index = index
  math.randomseed(core.seed())
  local pending -- claimed by the batch that finished the item before (claim_in_batch)
  local function run(w)
    serving = { w = w, def = def, generation = generation }
    local t0 = def.ahead_auto and core.now()
    pcall(bmdb.run, w, def.run) -- the decision is recorded and logged
    if t0 then time_item(def, core.now() - t0) end
    local n = serving.next
    serving = nil
    pending = n and adopt(def, n[1], n[2], n[3], n[4], n[5])
  end
  while true do
    if core.state() ~= "running" or core.generation() ~= generation then
      local w = pending or take_handed(def)
      if not w then return core.state() ~= "running" and "stop" or "reload" end
      run(w)
      goto continue
    end
    local ok, w
    if pending then
      ok, w = true, pending
    else
      ok, w = pcall(claim_in_turn, def, nil, generation)
    end
    if not ok then
      if core.state() ~= "running" then
        -- draining or cancelling: the loop ends at the top
      elseif is_error(w, "sql") and (w.sqlstate == "40001" or w.sqlstate == "40P01") then
        -- Contention that outlasted the retries: nothing failed; this
        -- slot backs off and claims again.
        core.log("info", "claim contended, backing off", { process = def.process, error = tostring(w) })
      else
        core.log("warn", "claim failed", { process = def.process, error = bmdb.describe(w) })
      end
      core.idle_wait(def.process, def.poll * (0.8 + 0.4 * math.random()))
    elseif w then
      core.wake_local(def.process) -- there may be more: pass the baton
      run(w)
    elseif core.state() ~= "running" or core.generation() ~= generation then
      -- the claim gave way to a drain or a reload: the top of the loop says which
    else
      core.count("empty", def.process)
      core.log("debug", "slot idle", { "process", def.process, "slot", index })
      core.idle_wait(def.process, def.poll * (0.8 + 0.4 * math.random()))
    end
    ::continue::
  end
end

return bmdb
