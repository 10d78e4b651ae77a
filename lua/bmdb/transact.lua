-- bmdb/transact.lua -- fenced transactions (bmdb.transact) and what this
-- Lua state is in while it runs them: the work item whose body runs, the
-- session each item was locked under, the transaction open now, the
-- wake-ups to send after it commits, and what the state holds for the
-- host meanwhile. How a transaction is retried (retryable) and refused
-- when nested live here too.
local core = require "bmdb.core"
local K = core.kinds
local U = require "bmdb.util"
local raise, argerror, is_error = U.raise, U.argerror, U.is_error

local T = {}

-- How long transact keeps retrying before it raises, in seconds. Ordinary
-- contention (many slots claiming from the same candidates) can take
-- dozens of attempts; a bound by time rather than by a small count keeps
-- it from surfacing as a failure. Specs shorten it (bmdb.internal's
-- retry_seconds is this one).
T.retry_seconds = 30

-- The work item whose body is running in this state, if any: a transaction
-- inside a body belongs to the session that holds the item's lock, so it
-- fails once that session is gone even if the host already has a new one.
local current_work = nil

-- The session userdata each work item was locked under, out of the body's
-- reach (w.session_id is its id). Only work items have one.
local handles = setmetatable({}, { __mode = "k" })

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
-- the host's claims or the batch; leave_item lets go of them then.
local held = {}
function T.hold(let_go) held[#held + 1] = let_go end
function T.unhold() held[#held] = nil end

-- w's session (nil for what is not a work item); bind sets it when w is made.
function T.item_session(w) return handles[w] end
function T.bind(w, sess) handles[w] = sess end

local function session_for(work)
  if work then return handles[work] end
  return core.session()
end
T.session_for = session_for

function T.running() return current_work end

-- The session that the running code's host-owned I/O and sleeps are
-- fenced by (host/iofence.h): the current item's, none outside work.
function T.io_session()
  return current_work and handles[current_work] or nil
end

-- The open transaction and its wake-ups queue; set_open makes tx the open
-- one (nil: none), for transactions transact_on does not run (a batch's).
function T.open_tx() return open_tx, after_commit end
function T.set_open(tx, wakes) open_tx, after_commit = tx, wakes end

-- Makes w the running item. Returns what leave_item restores.
function T.enter_item(w)
  local outer, outer_tx, depth = current_work, open_tx, #held
  current_work = w
  return outer, outer_tx, depth
end

-- Restores the running item enter_item found. True when the body left a
-- transaction open (a coroutine yielded inside it and was never resumed:
-- it would hold its locks, and its connection, for good): it is rolled
-- back and what the state held meanwhile is let go.
function T.leave_item(outer, outer_tx, depth)
  current_work = outer
  if open_tx == outer_tx then return false end
  local tx = open_tx
  open_tx, after_commit = outer_tx, nil
  pcall(tx.rollback, tx) -- (refused for a batch's: the batch fails below)
  for i = #held, depth + 1, -1 do
    pcall(held[i])
    held[i] = nil
  end
  return true
end

function T.refuse_nested(what)
  if open_tx then
    raise(K.nested, 3, what .. ": a transaction is already open in this Lua state; " ..
      "use the tx you have (a second transaction would wait on the first one's locks)")
  end
end
local refuse_nested = T.refuse_nested

-- What transact retries: serialization failures and deadlocks, and a lost
-- connection (on a fresh one), except when it was lost during COMMIT: the
-- transaction may have committed, and running fn again could do its work
-- twice, so that error goes to the caller unchanged.
function T.retryable(err)
  if not is_error(err) then return false end
  if err.kind == K.sql then
    -- stale_statement: a statement this connection had prepared met a
    -- changed schema (a migration ran); prepared again, it runs.
    return err.sqlstate == "40001" or err.sqlstate == "40P01" or err.stale_statement == true
  end
  return err.kind == K.connection and err.outcome ~= "unknown"
end
local retryable = T.retryable

-- An item's own timeout is given up locally first, as a session's
-- deadline is (tx_commit): its local deadline was set before the claim
-- was sent, so it passes before the database's. Past it the item's
-- transactions commit nothing, whatever the database would still have
-- allowed for a few milliseconds. Returns the "lost" error, or nil.
function T.past_deadline(w)
  if w._deadline and core.now() >= w._deadline then
    w._lost = w._lost or ("timeout after " .. w._timeout .. "s")
    local what = w._loop and "the hold on loop " .. w.name or "the lock on " .. w.machine .. " " .. w.process
    return core.error(K.lost, "lost: " .. what .. " was taken away: " .. w._lost)
  end
end
local past_deadline = T.past_deadline

local send_wake

-- Runs fn(tx) in one fenced SERIALIZABLE transaction on sess, retrying
-- what retryable() allows with jittered backoff, for retry_seconds.
-- on is a session, or a work item: then the fence also checks that the
-- item's lock is still this claim's (its token), and a "lost" error marks
-- the item lost for good; or a loop's run (_loop): the fence checks the
-- loop's hold (its token) the same way.
local function transact_on(on, fn, ...)
  refuse_nested("bmdb.transact")
  local sess = handles[on]
  local w = sess and on or nil
  sess = sess or on
  local started = core.now()
  for attempt = 1, math.huge do
    local ok, tx
    if w and w._loop then
      ok, tx = pcall(core.begin, sess, nil, w.name, w._token)
    elseif w then
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
    if w and is_error(err, K.lost) and not w._lost then w._lost = err.message end
    local delay = -1
    if retryable(err) and core.now() - started < T.retry_seconds then
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
T.transact_on = transact_on

function T.transact(fn, ...)
  if type(fn) ~= "function" then argerror(2, 1, "transact", "function expected, got " .. type(fn)) end
  refuse_nested("bmdb.transact")
  return transact_on(current_work or core.session(), fn, ...)
end

-- Sends one wake-up in a transaction of its own. A server without
-- notifications (CockroachDB) says so: slots poll instead.
send_wake = function(process)
  local ok, err = pcall(transact_on, session_for(current_work), function(tx)
    tx:exec("SELECT pg_notify('bmdb_wake', $1)", process)
  end)
  if not ok and not (is_error(err, K.sql) and (err.sqlstate == "42883" or err.sqlstate == "0A000")) then
    error(err, 0)
  end
  return ok
end
T.send_wake = send_wake

return T
