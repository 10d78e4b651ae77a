-- provider.lua: the example workers' client of a bare-metal provider's
-- HTTP API (the fake one in examples/fake-provider/, `make` builds it as
-- build/fake-provider). A real deployment changes the URL, adds its
-- credentials and maps its own fields; the shape stays.
--
--   BMDB_PROVIDER_URL   the API's base URL (default http://127.0.0.1:8099)
--
--   provider.create(machine)  -> the provider's device id
--   provider.reboot(device)   -> nothing
--
-- Every call has a timeout and raises on an answer it cannot use, naming
-- the request and the status: raised in a body, that fails the item, which
-- is retried after its backoff.
local bmdb = require "bmdb"

local M = {}

M.name = "fake"
M.url = (os.getenv("BMDB_PROVIDER_URL") or "http://127.0.0.1:8099"):gsub("/+$", "")
M.timeout = 30 -- seconds for a whole call; the item's timeout bounds it too

-- Creates are rationed across the fleet, whatever the number of hosts and
-- slots: 120 a minute, in bursts of up to 10 (a provider's API quota). A
-- limiter is a local object; its limit is the fleet's rows.
local creates = bmdb.limit("provider-create", { rate = 120, per = 60, burst = 10 })

local function call(method, path, opts)
  local r = bmdb.http.request {
    method = method, url = M.url .. path,
    headers = opts and opts.headers, json = opts and opts.json,
    timeout = M.timeout, connect_timeout = 5,
  }
  if r.status >= 200 and r.status < 300 and type(r.json) == "table" then return r end
  local why = type(r.json) == "table" and r.json.error or r.json_error or r.body
  error(string.format("provider: %s %s answered %d (%s)", method, path, r.status, tostring(why)), 0)
end

-- POST /devices. The machine's id is the Idempotency-Key: a create that is
-- retried (its answer lost, the host gone before it recorded the device)
-- gets the device the first one made (200), never a second device.
function M.create(machine)
  creates:take() -- fenced: a lost lock stops the wait
  local r = call("POST", "/devices", { json = { machine = machine }, headers = { ["Idempotency-Key"] = machine } })
  if type(r.json.id) ~= "string" then error("provider: POST /devices answered without a device id", 0) end
  return r.json.id
end

-- GET /devices: every device the provider has, {id=, machine=, state=}.
function M.list()
  local devices = call("GET", "/devices").json.devices
  if type(devices) ~= "table" then error("provider: GET /devices answered without a device list", 0) end
  return devices
end

-- POST /devices/<id>/reboot. The device id is the one create returned (the
-- example workers keep it in machine_provided.provider_id).
function M.reboot(device)
  if type(device) ~= "string" or not device:match("^[%w._-]+$") then
    error("provider.reboot: a device id such as dev-1, got " .. tostring(device), 2)
  end
  call("POST", "/devices/" .. device .. "/reboot")
end

return M
