-- bmdb/work.lua -- the work item: locking one (lock, bmdb.work,
-- bmdb.try_work), running its body (run) and recording what it decided
-- (w:finish, w:fail, w:cancel, alone or in the host's batch of finishes),
-- what runs at its end (bmdb.at_item_end), and os.exit in a body.
--
-- Outcomes a correct script must expect -- the pair is held by someone
-- else, or in backoff -- are raised by bmdb.work and returned as nil, err
-- by bmdb.try_work.
local core = require "bmdb.core"
local K = core.kinds
local U = require "bmdb.util"
local B = require "bmdb.backoff"
local T = require "bmdb.transact"
local raise, argerror, is_error, finite, describe = U.raise, U.argerror, U.is_error, U.finite, U.describe
local transact_on, handle, hold, unhold = T.transact_on, T.item_session, T.hold, T.unhold

local M = {}

local Work = {}

-- What a work item is: its item table, as bmdb.core hands items (host/
-- lsched.c: machine, process, token, session_id, attempt, started). The
-- release acts on it, so it lives out of the body's reach, keyed by the
-- work item; a body can read its machine, process, session_id and
-- attempt (public), but not change them. So does the session userdata
-- the item was locked under (transact.lua's item_session).
local fixed = setmetatable({}, { __mode = "k" })
local public = { machine = true, process = true, session_id = true, attempt = true }

Work.__index = function(w, k)
  local method = Work[k]
  if method ~= nil then return method end
  local f = public[k] and fixed[w]
  return f and f[k]
end

Work.__newindex = function(w, k, v)
  if public[k] and fixed[w] then
    raise(K.usage, 2, "w." .. tostring(k) .. " is read-only: the item's machine, process, session_id and " ..
          "attempt are fixed when it is locked")
  end
  rawset(w, k, v)
end

-- The slot this state serves (serve sets it), for the host's record of
-- the item it holds.
local slot_index = 0
function M.set_slot(index) slot_index = index end

-- The serve loop's part in a finish (serve sets it with set_loop):
-- ending(w) answers whether this finish ends the item of a loop that runs
-- its next item after it, and then that loop's record and whether its
-- batch may claim; claim_in_batch(w, tx, s, peers) claims in the batch.
-- Without a loop (a one-off, bmdb.testing) a finish claims nothing.
local ending, claim_in_batch
function M.set_loop(ending_fn, claim_fn) ending, claim_in_batch = ending_fn, claim_fn end

local function check_undecided(w, what)
  if w._decided then
    -- Deciding twice is a bug in the body: say so in the log too, since
    -- the body may swallow the error.
    core.log("warn", "work decided twice", { "session", w.session_id, "machine", w.machine,
      "process", w.process, "attempt", w.attempt, "decision", w._decided:lower(), "refused", what })
    raise(K.usage, 3, "w:" .. what .. ": the work item was already decided (" .. w._decided .. ")")
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

-- Whether err says a COMMIT was sent and no answer came back: what it
-- committed is unknown.
local function outcome_unknown(err) return is_error(err, K.connection) and err.outcome == "unknown" end

-- What a batch's member lets go of when its commit function is left
-- behind: the batch fails (its transaction's state is unknown).
local function fail_batch() core.batch_leave(false, true) end

-- A finish in the host's batch (host/sched.h): commit_fn runs at once,
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
  local called, joined, tx = pcall(core.batch_join, handle(w))
  if not called or joined ~= "joined" then
    core.finish_leave()
    if not called then error(joined, 0) end -- the host is cancelling
    return false, nil, outcome_unknown(tx) -- (tx: nil when "alone", else the batch's error)
  end
  hold(core.finish_leave)
  local r, wakes = { true }, {}
  if commit_fn then
    T.set_open(tx, wakes)
    hold(fail_batch)
    r = { pcall(commit_fn, tx) }
    unhold()
    T.set_open(nil, nil)
  end
  local ok, err = r[1], r[2]
  if ok then
    err = T.past_deadline(w)
    ok = not err
  end
  local fatal = not ok and (T.retryable(err) or is_error(err, K.session_expired))
  -- s: this finish ends the item of a serve loop that runs its next item
  -- after it, so the batch's claim may claim one for it (batch_leave).
  local s, may_claim
  if ok and ending then s, may_claim = ending(w) end
  -- left: "committed" (with the next item the closer's claim handed s),
  -- "undone" (commit_fn's own failure), "claim" (peers: claim in the
  -- batch, then the same as committed), or nil and the batch's error.
  local left, detail = core.batch_leave(ok, fatal, fixed[w], s ~= nil, may_claim)
  if left == "claim" then
    left, detail = claim_in_batch(w, tx, s, detail)
  elseif left == "committed" and detail then
    s.next = detail
  end
  unhold()
  core.finish_leave()
  if left == "committed" then
    for _, process in ipairs(wakes) do pcall(T.send_wake, process) end
    return true, { unpack(r, 2, table.maxn(r)) }
  end
  -- The batch failed, under commit_fn too: its error may not be commit_fn's own.
  if left == nil then return false, nil, outcome_unknown(detail) end
  if is_error(err, K.lost) and not w._lost then w._lost = err.message end
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
      seconds = B.backoff_next(spec, core.backoff_last(tx, w.machine, w.process))
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
  if event == "Finished" and w._token and not T.open_tx() then
    local ok, r, unknown = finish_in_batch(w, commit_fn)
    if ok then results = r end
    uncertain = unknown
  end
  while not results do
    -- Finishes run while no claim of this host does (host/sched.h).
    core.finish_enter()
    hold(core.finish_leave)
    local r = { pcall(transact_on, w, decide) }
    unhold()
    core.finish_leave()
    local err = r[2]
    if r[1] then
      results = { unpack(r, 2, table.maxn(r)) }
    elseif uncertain and is_error(err, K.lost) then
      results = {} -- the earlier attempt committed; commit_fn's results went with it
    elseif is_error(err, K.connection) and core.state() ~= "cancelling" and handle(w):alive() then
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
  B.check_spec(backoff, 2, "fail", 1)
  release(self, "Failed", cause ~= nil and describe(cause) or "failed", backoff or self._backoff)
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

-- A body's error for its cause: an error object keeps itself and gets its
-- traceback as a field (the C message handler does the same); anything
-- else becomes its description followed by the traceback.
local function traceback(err)
  if is_error(err) then
    if rawget(err, "traceback") == nil then err.traceback = debug.traceback("", 2):gsub("^\n", "") end
    return err
  end
  return debug.traceback(describe(err), 2)
end
M.traceback = traceback -- (a loop's run is handled the same: loop.lua)

-- What a body's failure decides: cancellation and a lost session cannot be
-- recorded by this session; anything else is a failure with backoff.
local function settle_failure(w, err, msg)
  if w._decided then return end
  if is_error(err, K.canceled) or is_error(err, K.session_expired) or is_error(err, K.lost)
     or not w:alive() then
    -- Nothing this session can record any more: at shutdown the host
    -- records Canceled for every lock it still holds; a lost lock is
    -- recorded Abandoned by whoever collects or takes it over.
    if not pcall(w.cancel, w) then
      local shutdown = core.state() == "cancelling"
      w._decided = shutdown and "Canceled" or "Lost"
      local why = w._lost or (is_error(err, K.lost) and err.message) or "session expired"
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

-- A work item for item, a table as bmdb.core hands items (its machine,
-- attempt and token; started, core.now() before the claim was sent, so
-- the local deadline passes before the database's: now when it has
-- none), locked under sess for def: the worker (its process, backoff and
-- timeout), or what bmdb.work's call says of them. The item becomes the
-- work item's own, naming its process and session.
function M.new_work(sess, def, item)
  local timeout = def.timeout
  local w = setmetatable({ _backoff = def.backoff, _decided = false, _started = core.now(), _token = item.token,
                           _timeout = timeout, _deadline = timeout and (item.started or core.now()) + timeout }, Work)
  item.process, item.session_id = def.process, sess:id()
  fixed[w] = item
  T.bind(w, sess)
  log_event(w, "started")
  return w
end
local new_work = M.new_work

-- Locks (machine, process) for the current session, in one transaction.
-- Returns the work item, or nil and an error object of kind "held" or
-- "backoff" (with backoff_until) when it cannot. fname and level name the
-- public call for argument errors.
function M.lock(machine, process, opts, fname, level)
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
  local status, detail = transact_on(sess, function(tx)
    return core.lock(tx, machine, process, B.claim_opts(opts and opts.backoff, timeout))
  end)
  if status == "held" then
    return nil, core.error(K.held, "machine " .. machine .. " is already held for " .. process)
  elseif status == "paused" or status == "onhold" then
    local e = core.error(K.held, status == "paused"
      and "process " .. process .. " is paused" .. (detail ~= "" and ": " .. detail or "")
      or "machine " .. machine .. " is on hold" .. (detail ~= "" and ": " .. detail or ""))
    e.reason = status
    return nil, e
  elseif status == "backoff" then
    local e = core.error(K.backoff, "machine " .. machine .. " is in backoff for " .. process ..
                         " until " .. detail)
    e.backoff_until = detail
    return nil, e
  end
  detail.started = started -- "locked": detail is the item
  return new_work(sess, { process = process, backoff = opts and opts.backoff, timeout = timeout }, detail)
end
local lock = M.lock

-- Runs body(w) on a claimed item and settles it: return = finish (unless
-- the body decided), raise = fail with the error and traceback as cause.
local function run_body(w, body)
  local outer, outer_tx, depth = T.enter_item(w)
  if w._token then
    core.track(w._token, w.machine, w.process, slot_index, w._timeout or 0,
               w._deadline and w._deadline - w._timeout)
  end
  local results = { xpcall(body, traceback, w) }
  if T.leave_item(outer, outer_tx, depth) then
    core.log("warn", "rolled back a transaction the body left open (a coroutine yielded inside it)",
             { "machine", w.machine, "process", w.process })
  end
  if results[1] then
    if not w._decided then
      local ok, err = pcall(w.finish, w)
      if not ok then
        settle_failure(w, err, describe(err))
        error(err, 0)
      end
    end
    return unpack(results, 2, table.maxn(results))
  end
  local err = results[2]
  settle_failure(w, err, describe(err))
  error(err, 0)
end
-- The item stays tracked while it is settled: a cancel notified meanwhile
-- still marks it lost.
-- Then what the body left to the item's end (bmdb.at_item_end) runs,
-- last registered first: the item is untracked, so no lost hook cuts it.
-- The end of w, a work item or a loop's run, whose log lines name it by
-- fields (a list of keys and values): untracked, so no lost hook cuts
-- what follows, then what its body left to its end runs.
function M.end_item(w, fields)
  if w._token then core.untrack(w._token) end
  local at_end = w._at_end
  w._at_end = nil
  for i = #(at_end or {}), 1, -1 do
    local ok, err = pcall(at_end[i])
    if not ok then
      local kv = { unpack(fields) }
      kv[#kv + 1], kv[#kv + 2] = "error", describe(err)
      core.log("warn", "cleanup at the end of an item failed", kv)
    end
  end
end

function M.run(w, body)
  local r = { pcall(run_body, w, body) }
  M.end_item(w, { "machine", w.machine, "process", w.process })
  if not r[1] then error(r[2], 0) end
  return unpack(r, 2, table.maxn(r))
end
local run = M.run

function M.work(machine, process, body, opts)
  if type(body) ~= "function" then argerror(2, 3, "work", "function expected, got " .. type(body)) end
  local w, err = lock(machine, process, opts, "work", 2)
  if not w then error(err, 2) end
  return run(w, body)
end

-- bmdb.work, but a pair held by someone else or in backoff is an outcome,
-- not an error: nil and the error object come back instead.
function M.try_work(machine, process, body, opts)
  if type(body) ~= "function" then argerror(2, 3, "try_work", "function expected, got " .. type(body)) end
  local w, err = lock(machine, process, opts, "try_work", 2)
  if not w then return nil, err end
  return run(w, body)
end

-- fn() runs once the running item (or loop run) has ended, however it ended (for
-- what a module holds on the item's behalf, such as bmdb.limit's
-- places). False outside work: nothing is registered.
function M.at_item_end(fn)
  local w = T.running()
  if not w then return false end
  local t = w._at_end or {}
  t[#t + 1] = fn
  w._at_end = t
  return true
end

-- os.exit in a body stops the host (lstate.c); the item that called it
-- counts as failed, with its worker's backoff, so a body that exits its
-- host on every try backs off instead of stopping host after host.
if core.is_os_exit(os.exit) then
  local host_exit = os.exit
  os.exit = function(status, ...)
    local w = T.running()
    if w and not w._decided and w:alive() then
      pcall(w.fail, w, "the body called os.exit(" .. tostring(status) .. ")")
    end
    return host_exit(status, ...)
  end
end

return M
