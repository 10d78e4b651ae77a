-- bmdb/control.lua -- work control, fleet-wide: bmdb.cancel ends a lock
-- now; bmdb.pause and bmdb.resume stop and restart a process's claims;
-- bmdb.hold and bmdb.unhold keep every process off a machine. Each is
-- one transaction (core.control, core.cancel), and the holders or idle
-- slots it concerns are notified after its commit.
local core = require "bmdb.core"
local U = require "bmdb.util"
local T = require "bmdb.transact"
local argerror = U.argerror
local transact_on, session_for, refuse_nested = T.transact_on, T.session_for, T.refuse_nested

local M = {}

-- Sends a notification after a commit; a server without them
-- (CockroachDB) refuses, and the holders learn at their next bmdb call.
local function notify_after(channel, payload)
  pcall(transact_on, session_for(T.running()), function(tx)
    tx:exec("SELECT pg_notify($1, $2)", channel, payload)
  end)
end

local function control(op, name, reason, fname)
  refuse_nested("bmdb." .. fname)
  if reason ~= nil and type(reason) ~= "string" then
    argerror(3, 2, fname, "reason must be a string, got " .. type(reason))
  end
  local ok, r = pcall(transact_on, session_for(T.running()), function(tx)
    return core.control(tx, op, name, reason)
  end)
  if not ok then error(r, 3) end
  if r and (op == "resume" or op == "unhold") then notify_after("bmdb_wake", op == "resume" and name or "") end
  return r
end

-- Ends the lock on (machine, process) now, recorded Canceled with the
-- reason; its holder's body is interrupted and commits nothing. True when
-- a lock was canceled, false when none was held.
function M.cancel(machine, process, reason)
  refuse_nested("bmdb.cancel")
  if not core.valid_uuid(machine) then argerror(2, 1, "cancel", "machine id is not a UUID: " .. tostring(machine)) end
  if not core.valid_process(process) then
    argerror(2, 2, "cancel", "invalid process name " .. string.format("%q", tostring(process)))
  end
  if reason ~= nil and type(reason) ~= "string" then
    argerror(2, 3, "cancel", "reason must be a string, got " .. type(reason))
  end
  local ok, token = pcall(transact_on, session_for(T.running()), function(tx)
    return core.cancel(tx, machine, process, reason)
  end)
  if not ok then error(token, 2) end
  if not token then return false end
  notify_after("bmdb_cancel", token)
  notify_after("bmdb_wake", process)
  return true
end

-- Fleet-wide: no claim of process succeeds until it is resumed.
function M.pause(process, reason) return control("pause", process, reason, "pause") end
-- True when it was paused.
function M.resume(process) return control("resume", process, nil, "resume") end
-- No process claims machine until it is released; both are recorded in
-- its history with the reason.
function M.hold(machine, reason) return control("hold", machine, reason, "hold") end
-- True when it was on hold.
function M.unhold(machine, reason) return control("unhold", machine, reason, "unhold") end

-- Ends the backoff of (machine, process) now, or, given a table, of
-- every pair of its process in backoff whose cause contains cause and
-- whose last failure was at or after since; each recorded Retried with
-- the reason. The count of attempts is kept (retry.h says why). One
-- pair: true when it was in backoff. Bulk: how many pairs it cleared (or
-- with dry_run, would clear), one transaction per batch of them.
function M.retry(machine, process, reason)
  refuse_nested("bmdb.retry")
  if type(machine) == "table" then
    local o = machine
    for k in pairs(o) do
      if k ~= "process" and k ~= "cause" and k ~= "since" and k ~= "dry_run" and k ~= "reason" then
        argerror(2, 1, "retry", "unknown field " .. string.format("%q", tostring(k)))
      end
    end
    if not core.valid_process(o.process) then
      argerror(2, 1, "retry", "process: invalid process name " .. string.format("%q", tostring(o.process)))
    end
    for _, f in ipairs { "cause", "since", "reason" } do
      if o[f] ~= nil and type(o[f]) ~= "string" then
        argerror(2, 1, "retry", f .. " must be a string, got " .. type(o[f]))
      end
    end
    if o.dry_run ~= nil and type(o.dry_run) ~= "boolean" then
      argerror(2, 1, "retry", "dry_run must be a boolean, got " .. type(o.dry_run))
    end
    local total = 0
    repeat
      local ok, n = pcall(transact_on, session_for(T.running()), function(tx)
        return core.retry_batch(tx, o.process, o.cause, o.since, o.reason, o.dry_run)
      end)
      if not ok then error(n, 2) end
      total = total + n
      if n > 0 and not o.dry_run then notify_after("bmdb_wake", o.process) end
    until n == 0 or o.dry_run
    return total
  end
  if not core.valid_uuid(machine) then argerror(2, 1, "retry", "machine id is not a UUID: " .. tostring(machine)) end
  if not core.valid_process(process) then
    argerror(2, 2, "retry", "invalid process name " .. string.format("%q", tostring(process)))
  end
  if reason ~= nil and type(reason) ~= "string" then
    argerror(2, 3, "retry", "reason must be a string, got " .. type(reason))
  end
  local ok, r = pcall(transact_on, session_for(T.running()), function(tx)
    return core.retry(tx, machine, process, reason)
  end)
  if not ok then error(r, 2) end
  if r then notify_after("bmdb_wake", process) end
  return r
end

return M
