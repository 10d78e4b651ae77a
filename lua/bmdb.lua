-- bmdb.lua -- the `bmdb` module scripts use: transact, work, backoff, and
-- the host services (session, sleep, log, wake).
--
-- The C core (bmdb.core) does SQL, sessions and locks; this file holds the
-- policies: how a transaction is retried, what a work body's return or
-- error decides, how backoff grows. It runs unchanged in the binary (where
-- it is embedded) and under busted (where bmdb.core is build/bmdb/core.so).
local core = require "bmdb.core"

local bmdb = {}

local function is_error(v, kind)
  return core.is_error(v) and (kind == nil or v.kind == kind)
end
bmdb.is_error = is_error

-- The work item whose body is running in this state, if any: a transaction
-- inside a body belongs to the session that holds the item's lock, so it
-- fails once that session is gone even if the host already has a new one.
local current_work = nil

local function session_for(work)
  if work then return work._session end
  return core.session()
end

-- Runs fn(tx) in one fenced SERIALIZABLE transaction on sess, retrying
-- serialization failures and deadlocks with jittered backoff.
local function transact_on(sess, fn, ...)
  for attempt = 1, math.huge do
    local tx = core.begin(sess)
    local results = { pcall(fn, tx, ...) }
    local ok, err = results[1], results[2]
    if ok then
      ok, err = pcall(tx.commit, tx)
      if ok then return unpack(results, 2, table.maxn(results)) end
    else
      tx:rollback()
    end
    local retryable = is_error(err, "sql") and (err.sqlstate == "40001" or err.sqlstate == "40P01")
    local delay = retryable and core.retry_delay(attempt) or -1
    if delay < 0 then error(err, 0) end
    core.sleep(delay)
  end
end

function bmdb.transact(fn, ...)
  if type(fn) ~= "function" then
    error("bmdb.transact: expected a function(tx), got " .. type(fn), 2)
  end
  return transact_on(session_for(current_work), fn, ...)
end

-- Backoff periods (DESIGN.md): whole seconds, never below 1. Without a spec
-- the previous period is kept; without exponent > 1 a spec gives `initial`;
-- otherwise each consecutive failure multiplies, rounds up and caps.
function bmdb.backoff_next(spec, last)
  if last ~= nil then last = math.max(1, math.ceil(last)) end
  if spec == nil then return last or 1 end
  if type(spec) == "number" then spec = { initial = spec } end
  if type(spec) ~= "table" then
    error("backoff: expected a table {initial=, maximum=, exponent=} or a number, got " .. type(spec), 2)
  end
  local initial = math.max(1, math.ceil(tonumber(spec.initial) or 1))
  local maximum = math.max(initial, math.ceil(tonumber(spec.maximum) or initial))
  local exponent = math.max(1, tonumber(spec.exponent) or 1)
  if exponent <= 1 or last == nil then return initial end
  return math.min(maximum, math.ceil(last * exponent))
end

local Work = {}
Work.__index = Work

local function check_undecided(w, what)
  if w._decided then
    error("w:" .. what .. ": the work item was already decided (" .. w._decided .. ")", 3)
  end
end

local function release(w, event, cause, spec, commit_fn)
  return transact_on(w._session, function(tx)
    local seconds = 0
    if event == "Failed" then
      seconds = bmdb.backoff_next(spec, core.backoff_last(tx, w.machine, w.process))
    end
    core.release(tx, w.machine, w.process, event, cause, seconds)
    if commit_fn then return commit_fn(tx) end
  end)
end

-- Releases the lock, clears backoff and records Finished; commit_fn(tx)
-- runs in the same transaction, so its writes commit with the release.
function Work:finish(commit_fn)
  check_undecided(self, "finish")
  if commit_fn ~= nil and type(commit_fn) ~= "function" then
    error("w:finish: expected a function(tx) or nothing, got " .. type(commit_fn), 2)
  end
  local r = { release(self, "Finished", nil, nil, commit_fn) }
  self._decided = "Finished"
  return unpack(r, 1, table.maxn(r))
end

-- Releases the lock, records Failed with cause and sets backoff (the spec
-- given, else the worker's, else the previous period).
function Work:fail(cause, backoff)
  check_undecided(self, "fail")
  release(self, "Failed", cause ~= nil and tostring(cause) or "failed", backoff or self._backoff)
  self._decided = "Failed"
end

function Work:cancel()
  check_undecided(self, "cancel")
  release(self, "Canceled", "canceled")
  self._decided = "Canceled"
end

function Work:alive()
  return not self._decided and core.state() ~= "cancelling" and self._session:alive()
end

local function traceback(err)
  if is_error(err) then return err end
  return debug.traceback(tostring(err), 2)
end

-- What a body's failure decides: cancellation and a lost session cannot be
-- recorded by this session; anything else is a failure with backoff.
local function settle_failure(w, err, msg)
  if w._decided then return end
  if is_error(err, "cancelled") or is_error(err, "session_expired") or not w:alive() then
    -- The host records Canceled at shutdown; a lost lock is the collector's.
    pcall(w.cancel, w)
    return
  end
  local ok, ferr = pcall(w.fail, w, msg)
  if not ok then
    core.log("error", "could not record the failure", {
      machine = w.machine, process = w.process, error = tostring(ferr) })
  end
end

-- Locks (machine, process) for the current session, in one transaction.
-- Raises error objects of kind "held" or "backoff" when it cannot.
function bmdb.lock(machine, process, opts)
  if not core.valid_uuid(machine) then
    error("bmdb.work: machine id is not a UUID: " .. tostring(machine), 3)
  end
  if not core.valid_process(process) then
    error("bmdb.work: invalid process name " .. string.format("%q", tostring(process)) ..
          " (a letter, then letters, digits or _, at most 63 characters)", 3)
  end
  local sess = core.session()
  local status, detail = transact_on(sess, function(tx)
    return core.lock(tx, machine, process)
  end)
  if status == "held" then
    error(core.error("held", "machine " .. machine .. " is already held for " .. process), 3)
  elseif status == "backoff" then
    local e = core.error("backoff", "machine " .. machine .. " is in backoff for " .. process ..
                         " until " .. detail)
    e.until_ = detail
    error(e, 3)
  end
  return setmetatable({
    machine = machine, process = process, session = sess:id(), attempt = detail,
    _session = sess, _backoff = opts and opts.backoff, _decided = false,
  }, Work)
end

-- Runs body(w) on a claimed item and settles it: return = finish (unless
-- the body decided), raise = fail with the error and traceback as cause.
function bmdb.run(w, body)
  local outer = current_work
  current_work = w
  local results = { xpcall(body, traceback, w) }
  current_work = outer
  if results[1] then
    if not w._decided then w:finish() end
    return unpack(results, 2, table.maxn(results))
  end
  local err = results[2]
  settle_failure(w, err, tostring(err))
  error(err, 0)
end

function bmdb.work(machine, process, body, opts)
  if type(body) ~= "function" then
    error("bmdb.work: expected a function(w) as third argument, got " .. type(body), 2)
  end
  return bmdb.run(bmdb.lock(machine, process, opts), body)
end

function bmdb.session()
  local s = session_for(current_work)
  return { id = s:id(), component = s:component(), alive = s:alive() }
end

-- Sleeps, but not past shutdown or the loss of the session in use.
function bmdb.sleep(seconds)
  if type(seconds) ~= "number" or seconds < 0 then
    error("bmdb.sleep: expected seconds >= 0, got " .. tostring(seconds), 2)
  end
  local s = current_work and current_work._session or nil
  if core.sleep(seconds, s) then return end
  if core.state() == "cancelling" then
    error(core.error("cancelled", "cancelled: the host is shutting down"), 2)
  end
  error(core.error("session_expired", "session expired"), 2)
end

bmdb.log = {}
for _, level in ipairs { "debug", "info", "warn", "error" } do
  bmdb.log[level] = function(msg, fields)
    core.log(level, tostring(msg), fields)
  end
end

-- Wakes idle slots of a process on every host (NOTIFY is transactional:
-- inside transact it is sent at commit).
function bmdb.wake(process)
  if not core.valid_process(process) then
    error("bmdb.wake: invalid process name " .. string.format("%q", tostring(process)), 2)
  end
  bmdb.transact(function(tx) tx:exec("SELECT pg_notify('bmdb_wake', $1)", process) end)
end

return bmdb
