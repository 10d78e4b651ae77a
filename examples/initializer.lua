-- initializer.lua: installs the agent on provided machines by running a
-- local command, as a real one runs `ssh root@HOST agent-install`.
--   bmdb-host examples/initializer.lua
--   BMDB_AGENT_INSTALL   the command, given MACHINE DEVICE (default: the
--                        examples/agent-install beside this file)
--   BMDB_AGENT_TIMEOUT   seconds it may take (default 120)
-- A machine is a candidate once provided and while it has no
-- machine_initialized row and no live work or backoff for Initialize.
local bmdb = require "bmdb"

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local command = os.getenv("BMDB_AGENT_INSTALL") or (here .. "agent-install")
local timeout = tonumber(os.getenv("BMDB_AGENT_TIMEOUT") or "120")
if not timeout or timeout <= 0 then
  error("BMDB_AGENT_TIMEOUT: a number of seconds > 0, got " .. tostring(os.getenv("BMDB_AGENT_TIMEOUT")), 0)
end

return {
  bmdb.worker {
    process = "Initialize",
    concurrency = 4,
    timeout = timeout + 60,
    backoff = { initial = 10, maximum = 600, exponent = 2 },
    select = function(tx, limit)
      return tx:query([[
        SELECT p.machine_id FROM machine_provided p
        WHERE NOT EXISTS (SELECT 1 FROM machine_initialized i WHERE i.machine_id = p.machine_id)
          AND NOT EXISTS (SELECT 1 FROM work_blocked b
                          WHERE b.machine_id = p.machine_id AND b.process = 'Initialize')
        LIMIT $1]], limit)
    end,
    run = function(w)
      local device = bmdb.transact(function(tx)
        return tx:one("SELECT provider_id FROM machine_provided WHERE machine_id = $1", w.machine).provider_id
      end)
      -- No shell: argv as given. Past the timeout the command's process
      -- group is terminated and bmdb.exec raises (kind exec, reason
      -- timeout), which fails the item; so does a lost lock, at once.
      local r = bmdb.exec { argv = { command, w.machine, device }, timeout = timeout }
      if r.status ~= 0 then
        local how = r.status and ("exited " .. r.status) or ("killed by SIG" .. tostring(r.signal))
        local stderr = r.stderr:gsub("%s+$", "")
        return w:fail(string.format("agent-install %s: %s", how, stderr ~= "" and stderr or "(no stderr)"))
      end
      local version = r.stdout:match("^agent (%S+) installed")
      if not version then
        return w:fail("agent-install printed no agent version: " .. r.stdout)
      end
      w:finish(function(tx)
        tx:defer("INSERT INTO machine_initialized (machine_id, agent_version, output) VALUES ($1, $2, $3)",
                w.machine, version, r.stdout)
      end)
      bmdb.log.info("initialized", { machine = w.machine, provider_id = device, agent = version })
    end,
  },
}
