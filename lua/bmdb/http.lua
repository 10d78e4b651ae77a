-- bmdb/http.lua -- bmdb.http.request: the options a body writes, checked
-- and normalized for the transport in host/lhttp.c, which fences the
-- request (host/iofence.h) and keeps the slot's connections alive.
local core = require "bmdb.core"
local K = core.kinds
local T = require "bmdb.transact"
-- bmdb.json is loaded when a request first needs it.
local json_module
local function json()
  json_module = json_module or require "bmdb.json"
  return json_module
end

local M = {}

local DEFAULT_MAX_BODY = 16 * 1024 * 1024

local function usage(field, msg)
  error(core.error(K.usage, "bmdb.http.request: " .. field .. " " .. msg), 3)
end

local function seconds(opts, field)
  local v = opts[field]
  if v == nil then return nil end
  if type(v) ~= "number" or v ~= v or v <= 0 or v == math.huge then
    usage(field, "must be a finite number of seconds > 0, got " .. tostring(v))
  end
  return v
end

-- A header's name is an RFC 9110 token; its value may not break the line.
local function header_lines(headers, has_type)
  local lines = {}
  if headers == nil then return lines, has_type end
  if type(headers) ~= "table" then usage("headers", "must be a table of name = value") end
  local names = {}
  for k in pairs(headers) do names[#names + 1] = k end
  table.sort(names, function(a, b) return tostring(a) < tostring(b) end)
  for _, k in ipairs(names) do
    local v = headers[k]
    if type(k) ~= "string" or not k:match("^[%w!#$%%&'*+.^_`|~-]+$") then
      usage("headers", "has an invalid name " .. string.format("%q", tostring(k)))
    end
    if type(v) == "number" then v = tostring(v) end
    if type(v) ~= "string" or v:find("[\r\n%z]") then
      usage("headers", "value of " .. k .. " must be a string without CR, LF or NUL")
    end
    if k:lower() == "content-type" then has_type = true end
    lines[#lines + 1] = k .. ": " .. v
  end
  return lines, has_type
end

local function is_json_type(ctype)
  if not ctype then return false end
  local t = ctype:match("^%s*([^;%s]+)")
  t = t and t:lower() or ""
  return t == "application/json" or t:match("^application/[%w.-]+%+json$") ~= nil
end

-- bmdb.http.request{method=, url=, headers=, body= | json=, timeout=,
-- connect_timeout=, max_body=, tls_verify=, ca_file=}
-- -> {status=, headers=, body=, json=}
function M.request(opts)
  if type(opts) ~= "table" then usage("options", "must be a table, got " .. type(opts)) end
  local method = opts.method or "GET"
  if type(method) ~= "string" or not method:match("^[A-Z]+$") then
    usage("method", "must be an upper-case token such as GET or POST, got " .. tostring(method))
  end
  local url = opts.url
  if type(url) ~= "string" or not url:match("^[hH][tT][tT][pP][sS]?://") then
    usage("url", "must be an http:// or https:// URL, got " .. (type(url) == "string" and "a string of another scheme" or type(url)))
  end
  if url:find("[%s%z]") then usage("url", "may not contain spaces or NUL") end
  if opts.body ~= nil and opts.json ~= nil then usage("body", "and json are exclusive") end
  local body = opts.body
  if body ~= nil and type(body) ~= "string" then usage("body", "must be a string, got " .. type(body)) end
  local lines, has_type = header_lines(opts.headers, false)
  if opts.json ~= nil then
    body = json().encode(opts.json)
    if not has_type then lines[#lines + 1] = "Content-Type: application/json" end
  end
  local max_body = opts.max_body
  if max_body == nil then max_body = DEFAULT_MAX_BODY
  elseif type(max_body) ~= "number" or max_body < 0 or max_body ~= math.floor(max_body) or max_body == math.huge then
    usage("max_body", "must be a whole number of bytes >= 0, got " .. tostring(max_body))
  end
  local tls_verify = opts.tls_verify
  if tls_verify ~= nil and type(tls_verify) ~= "boolean" then usage("tls_verify", "must be a boolean") end
  if opts.ca_file ~= nil and type(opts.ca_file) ~= "string" then usage("ca_file", "must be a path") end
  for k in pairs(opts) do
    if not M.fields[k] then usage(tostring(k), "is not an option (see docs/talking-to-the-world.md)") end
  end
  local r = core.http_request({
    method = method, url = url, headers = lines, body = body,
    timeout = seconds(opts, "timeout"), connect_timeout = seconds(opts, "connect_timeout"),
    max_body = max_body, tls_verify = tls_verify ~= false, ca_file = opts.ca_file,
  }, T.io_session())
  if is_json_type(r.headers["content-type"]) and r.body ~= "" then
    local ok, v = pcall(json().decode, r.body)
    if ok then r.json = v else r.json_error = tostring(v) end
  end
  return r
end

M.fields = {
  method = true, url = true, headers = true, body = true, json = true, timeout = true,
  connect_timeout = true, max_body = true, tls_verify = true, ca_file = true,
}

return M
