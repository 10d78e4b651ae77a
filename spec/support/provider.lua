-- support/provider.lua -- the fake provider (examples/fake-provider/, built
-- as build/fake-provider) for specs and benchmarks: start one on a free
-- port, ask it, read its request log, stop it.
--
--   local P = require "support.provider"
--   local p = P.start { latency = 50, fail_every = 3 }
--   p.port, p.url                       -- 127.0.0.1's port, "http://127.0.0.1:PORT"
--   p:request("POST", "/devices", { body = '{"machine":"m1"}', headers = { ["Idempotency-Key"] = "k" } })
--   p:get("/devices")                   -- status, headers, body
--   p:stats()                           -- GET /_stats, decoded
--   p:config { latency_ms = 0 }         -- POST /_config
--   p:events("closed")                  -- the log's lines, parsed
--   p:stop()                            -- SIGTERM, reaped; its exit code
--
-- Each runs with --die-with-parent, so none outlives the busted process; it
-- is one of helpers' processes too (H.cleanup kills what is left), and
-- P.stop_all() (for an after_each) stops every one still running.
local H = require "support.helpers"
local http = require "support.http"

local P = {}

-- BMDB_FAKE_PROVIDER: another build of it (a sanitized one, say).
P.bin = os.getenv("BMDB_FAKE_PROVIDER") or H.root .. "/build/fake-provider"

local started = {}

local Provider = {}
Provider.__index = Provider

-- opts: port (0, any free one), latency (ms), fail_every, args (more
-- arguments), timeout (seconds to wait for it to listen, 10).
function P.start(opts)
  opts = opts or {}
  local log = H.tmpdir("provider") .. "/requests.log"
  local argv = { P.bin, "--die-with-parent", "--log", log, "--port", tostring(opts.port or 0) }
  if opts.latency then argv[#argv + 1] = "--latency"; argv[#argv + 1] = tostring(opts.latency) end
  if opts.fail_every then argv[#argv + 1] = "--fail-every"; argv[#argv + 1] = tostring(opts.fail_every) end
  for _, a in ipairs(opts.args or {}) do argv[#argv + 1] = a end
  local proc = H.spawn { argv = argv }
  local port
  local ok, err = pcall(H.wait_until, function()
    port = proc:stdout():match("^listening on 127%.0%.0%.1:(%d+)\n")
    return port or not proc:running()
  end, opts.timeout or 10, "the fake provider's `listening on` line")
  if not port then
    proc:kill("KILL")
    error(string.format("fake provider did not start (%s): %s%s", P.bin,
      ok and ("exit " .. tostring(proc.code)) or err, "\n" .. proc:stderr()), 2)
  end
  port = tonumber(port)
  local p = setmetatable({ proc = proc, pid = proc.pid, port = port, url = "http://127.0.0.1:" .. port,
                           log = log }, Provider)
  started[#started + 1] = p
  return p
end

-- One request on a connection of its own: status, headers, body (see
-- support/http.lua's request; opts: headers, body, timeout).
function Provider:request(method, path, opts)
  return http.request(self.port, method, path, opts)
end

function Provider:get(path, opts) return self:request("GET", path, opts) end

function Provider:post(path, body, headers)
  return self:request("POST", path, { body = body or "", headers = headers })
end

-- GET /_stats: {requests=, responses=, closed=, hanging=, devices=,
-- connections=, accepted=, latency_ms=, fail_every=, by_path={[path]=n}}.
-- Its JSON is flat but for by_path, whose keys are request paths.
function Provider:stats()
  local status, _, body = self:get("/_stats")
  assert(status == 200, "GET /_stats: " .. tostring(status) .. " " .. tostring(body))
  local by_path_text = body:match('"by_path":(%b{})')
  local out = { by_path = {} }
  for k, v in body:gsub('"by_path":%b{}', ""):gmatch('"([%w_]+)":(%d+)') do out[k] = tonumber(v) end
  for k, v in (by_path_text or ""):gmatch('"(.-)":(%d+)') do out.by_path[k] = tonumber(v) end
  return out
end

-- POST /_config {latency_ms=, fail_every=}: the settings now in force.
function Provider:config(t)
  local parts = {}
  for _, k in ipairs { "latency_ms", "fail_every" } do
    if t[k] then parts[#parts + 1] = string.format('"%s": %d', k, t[k]) end
  end
  local status, _, body = self:post("/_config", "{" .. table.concat(parts, ", ") .. "}")
  assert(status == 200, "POST /_config: " .. tostring(status) .. " " .. tostring(body))
  return { latency_ms = tonumber(body:match('"latency_ms":(%d+)')),
           fail_every = tonumber(body:match('"fail_every":(%d+)')) }
end

-- The request log's lines, oldest first, those of event `kind` only when
-- given: { {t = unix seconds, event =, method =, path =, status = n or nil}, ... }.
function Provider:events(kind)
  local out = {}
  for line in (H.read_file(self.log) or ""):gmatch("[^\n]+") do
    local t, event, method, path, status = line:match("^(%S+) (%S+) (%S+) (%S+) (%S+)$")
    if t and (kind == nil or event == kind) then
      out[#out + 1] = { t = tonumber(t), event = event, method = method, path = path, status = tonumber(status) }
    end
  end
  return out
end

-- SIGTERM, then waits (timeout seconds, 10) for it to exit: its exit code.
function Provider:stop(timeout)
  self.proc:kill("TERM")
  return self.proc:wait(timeout or 10)
end

function P.stop_all()
  for _, p in ipairs(started) do
    if p.proc:running() then p:stop() end
  end
  started = {}
end

return P
