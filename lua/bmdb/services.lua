-- bmdb/services.lua -- what a script calls beside work and control:
-- bmdb.session, bmdb.sleep, bmdb.log, bmdb.wake. Each acts for the
-- running item's session inside a body, the host's outside one.
local core = require "bmdb.core"
local K = core.kinds
local U = require "bmdb.util"
local T = require "bmdb.transact"
local raise, argerror, finite = U.raise, U.argerror, U.finite

local M = {}

function M.session()
  local s = T.session_for(T.running())
  return { id = s:id(), component = s:component(), alive = s:alive() }
end

-- Sleeps, but not past shutdown or the loss of the session in use.
function M.sleep(seconds)
  if not finite(seconds) or seconds < 0 then
    argerror(2, 1, "sleep", "expected a finite number of seconds >= 0, got " .. tostring(seconds))
  end
  if core.sleep(seconds, T.io_session()) then return end
  if core.state() == "cancelling" then
    raise(K.canceled, 2, "canceled: the host is shutting down")
  end
  raise(K.session_expired, 2, "session expired")
end

M.log = {}
for _, level in ipairs { "debug", "info", "warn", "error" } do
  M.log[level] = function(msg, fields)
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

-- Wakes idle slots of a process on every host. Inside a transaction it
-- rides on that transaction (NOTIFY is sent at commit, and not at all if
-- it rolls back); when this host has not seen the server take LISTEN, the
-- wake-up is sent right after the commit instead, so a server without
-- notifications cannot abort the transaction.
function M.wake(process)
  if not core.valid_process(process) then
    argerror(2, 1, "wake", "invalid process name " .. string.format("%q", tostring(process)))
  end
  local open_tx, after_commit = T.open_tx()
  if open_tx then
    if core.notify_enabled() then
      open_tx:exec("SELECT pg_notify('bmdb_wake', $1)", process)
    else
      after_commit[#after_commit + 1] = process
    end
    return true
  end
  local ok, err = pcall(T.send_wake, process)
  if not ok then error(err, 2) end
  return err
end

return M
