-- An operator's spec for the example workers, written with bmdb.testing.
-- Run it like any busted spec (docs/testing.md: "Testing your own workers"), from
-- the repository's top directory after `make` (it starts
-- build/fake-provider).
--
-- The examples take their settings from the environment, as under
-- systemd: the spec starts the fake provider on a free port and sets
-- BMDB_PROVIDER_URL (and, for the initializer, BMDB_AGENT_INSTALL and
-- BMDB_AGENT_TIMEOUT) with setenv before it loads them.
local T = require "bmdb.testing"
local bmdb = require "bmdb"
local ffi = require "ffi"

ffi.cdef [[
int setenv(const char *name, const char *value, int overwrite);
int unsetenv(const char *name);
]]
local function setenv(name, value)
  if value then ffi.C.setenv(name, value, 1) else ffi.C.unsetenv(name) end
end

-- build/fake-provider on a free port; the shell's `exec` makes the pid it
-- prints the provider's. --die-with-parent: it ends with this process.
local function start_provider()
  local out = assert(io.popen("echo $$; exec build/fake-provider --port 0 --die-with-parent"))
  local pid = tonumber(out:read("*l"))
  local port = (out:read("*l") or ""):match("^listening on 127%.0%.0%.1:(%d+)$")
  assert(pid and port, "build/fake-provider did not start (run make first)")
  local p = { url = "http://127.0.0.1:" .. port }
  -- The provider's own endpoints, through bmdb.http like the examples.
  function p.get(path) return bmdb.http.request { url = p.url .. path, timeout = 5 }.json end
  function p.post(path, body, headers)
    return bmdb.http.request { method = "POST", url = p.url .. path, json = body, headers = headers, timeout = 5 }
  end
  function p.stop()
    os.execute("kill " .. pid)
    out:close()
  end
  return p
end

local function alive(pid)
  local r = os.execute("kill -0 " .. pid .. " 2>/dev/null")
  return r == 0 or r == true
end

-- A command of the spec's own, standing in for agent-install.
local scripts = {}
local function script(text)
  local path = os.tmpname()
  local f = assert(io.open(path, "w"))
  f:write("#!/bin/sh\n", text, "\n")
  f:close()
  os.execute("chmod +x " .. path)
  scripts[#scripts + 1] = path
  return path
end

describe("the example workers", function()
  local db, provider

  setup(function()
    provider = start_provider()
    setenv("BMDB_PROVIDER_URL", provider.url)
    db = T.database { migrations = "examples/migrations" }
  end)

  teardown(function()
    db:close()
    provider.stop()
    for _, path in ipairs(scripts) do os.remove(path) end
  end)

  after_each(function()
    provider.post("/_config", { fail_every = 0 })
    setenv("BMDB_AGENT_INSTALL", nil)
    setenv("BMDB_AGENT_TIMEOUT", nil)
  end)

  local function new_machine()
    return db:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
  end

  local function provisioned()
    local m = new_machine()
    assert.equal("Finished", T.run_one("examples/provisioner.lua", "Provision", { machine = m }).event)
    return m, db:one("SELECT provider_id FROM machine_provided WHERE machine_id = $1", m).provider_id
  end

  it("provisioner: creates the machine's device through the provider's API, once", function()
    local before = provider.get("/_stats").devices
    local m = new_machine()
    local r = T.run_one("examples/provisioner.lua", "Provision", { machine = m })
    assert.same({ machine = m, attempt = 1, event = "Finished" }, r)
    local p = db:one("SELECT provider, provider_id FROM machine_provided WHERE machine_id = $1", m)
    assert.equal("fake", p.provider)
    assert.equal(m, provider.get("/devices/" .. p.provider_id).machine)
    assert.equal(before + 1, provider.get("/_stats").devices)
    -- the create took its token from the fleet's limit (provider.lua)
    assert.same({ kind = "rate", rate = 120, per = 60, burst = 10 },
      db:one("SELECT kind, rate, per, burst FROM limits WHERE name = 'provider-create'"))
    -- provided now: no longer a candidate
    assert.is_nil(T.run_one("examples/provisioner.lua", "Provision", { machine = m }))
  end)

  it("provisioner: a create retried after its answer was lost makes no second device", function()
    local m = new_machine()
    -- An earlier attempt's create reached the provider, but its answer
    -- never reached the host (the host died before it recorded it).
    local first = provider.post("/devices", { machine = m }, { ["Idempotency-Key"] = m })
    assert.equal(201, first.status)
    local before = provider.get("/_stats").devices
    assert.equal("Finished", T.run_one("examples/provisioner.lua", "Provision", { machine = m }).event)
    assert.equal(first.json.id,
      db:one("SELECT provider_id FROM machine_provided WHERE machine_id = $1", m).provider_id)
    assert.equal(before, provider.get("/_stats").devices)
  end)

  it("provisioner: a 503 from the provider fails the item into backoff", function()
    local before = provider.get("/_stats").devices
    provider.post("/_config", { fail_every = 1 })
    local m = new_machine()
    local r = T.run_one("examples/provisioner.lua", "Provision", { machine = m })
    assert.equal("Failed", r.event)
    assert.matches("provider: POST /devices answered 503 (provider unavailable)", tostring(r.error), 1, true)
    assert.same({ last_seconds = 5, attempts = 1 },
      db:one("SELECT last_seconds, attempts FROM work_backoff WHERE machine_id = $1 AND process = 'Provision'", m))
    assert.is_nil(db:one("SELECT 1 AS x FROM machine_provided WHERE machine_id = $1", m))
    assert.equal(before, provider.get("/_stats").devices)
    -- in backoff: not offered again until it ends
    provider.post("/_config", { fail_every = 0 })
    assert.is_nil(T.run_one("examples/provisioner.lua", "Provision", { machine = m }))
  end)

  it("recoverer: reboots through the API, failing into backoff while the provider answers 503", function()
    local m, device = provisioned()
    db:exec("INSERT INTO machine_failures (machine_id, reason) VALUES ($1, 'test')", m)
    provider.post("/_config", { fail_every = 1 })
    local r = T.run_one("examples/recoverer.lua", "Recover", { machine = m })
    assert.equal("Failed", r.event)
    assert.matches("provider: POST /devices/" .. device .. "/reboot answered 503", tostring(r.error), 1, true)
    assert.same({ last_seconds = 2, attempts = 1 },
      db:one("SELECT last_seconds, attempts FROM work_backoff WHERE machine_id = $1 AND process = 'Recover'", m))
    -- in backoff: not offered again until it ends
    assert.is_nil(T.run_one("examples/recoverer.lua", "Recover", { machine = m }))

    -- the backoff over and the provider back: the reboot goes through
    provider.post("/_config", { fail_every = 0 })
    assert.equal("provisioning", provider.get("/devices/" .. device).state)
    db:exec("UPDATE work_backoff SET backoff_until = now() WHERE machine_id = $1", m)
    r = T.run_one("examples/recoverer.lua", "Recover", { machine = m })
    assert.same({ machine = m, attempt = 2, event = "Finished" }, r)
    assert.equal("rebooting", provider.get("/devices/" .. device).state)
    assert.is_nil(db:one("SELECT 1 AS x FROM machine_failures WHERE machine_id = $1", m))
  end)

  it("initializer: runs agent-install for a provided machine and records what it installed", function()
    local m, device = provisioned()
    local r = T.run_one("examples/initializer.lua", "Initialize", { machine = m })
    assert.same({ machine = m, attempt = 1, event = "Finished" }, r)
    assert.same({ agent_version = "1.0", output = "agent 1.0 installed on " .. m .. " (device " .. device .. ")\n" },
      db:one("SELECT agent_version, output FROM machine_initialized WHERE machine_id = $1", m))
    -- initialized now: no longer a candidate
    assert.is_nil(T.run_one("examples/initializer.lua", "Initialize", { machine = m }))
    -- a machine not provided yet is no candidate either
    assert.is_nil(T.run_one("examples/initializer.lua", "Initialize", { machine = new_machine() }))
  end)

  it("initializer: a command that exits non-zero fails the item with its stderr as the cause", function()
    local m = provisioned()
    setenv("BMDB_AGENT_INSTALL", script([[echo "ssh: connect to host $1 port 22: No route to host" >&2; exit 255]]))
    local r = T.run_one("examples/initializer.lua", "Initialize", { machine = m })
    assert.same({ machine = m, attempt = 1, event = "Failed" }, r)
    local b = db:one("SELECT cause, last_seconds FROM work_backoff WHERE machine_id = $1 AND process = 'Initialize'", m)
    assert.same({ cause = "agent-install exited 255: ssh: connect to host " .. m .. " port 22: No route to host",
                  last_seconds = 10 }, b)
    assert.is_nil(db:one("SELECT 1 AS x FROM machine_initialized WHERE machine_id = $1", m))
  end)

  it("initializer: a command still running at its timeout is stopped and fails the item", function()
    local m = provisioned()
    local pidfile = os.tmpname()
    scripts[#scripts + 1] = pidfile
    setenv("BMDB_AGENT_INSTALL", script("echo $$ > " .. pidfile .. "; exec sleep 600"))
    setenv("BMDB_AGENT_TIMEOUT", "0.5")
    local r = T.run_one("examples/initializer.lua", "Initialize", { machine = m })
    assert.equal("Failed", r.event)
    assert.is_true(bmdb.is_error(r.error, "exec"), tostring(r.error))
    assert.equal("timeout", r.error.reason)
    assert.matches("timed out after 0.5s", tostring(r.error), 1, true)
    local f = assert(io.open(pidfile))
    local pid = tonumber(f:read("*l"))
    f:close()
    assert.is_number(pid)
    assert.is_false(alive(pid), "the command outlived its timeout")
    assert.is_nil(db:one("SELECT 1 AS x FROM machine_initialized WHERE machine_id = $1", m))
  end)
end)
