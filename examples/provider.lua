-- provider.lua: runs the provider command beside this file (required by
-- the example workers; a real deployment calls its provider's API here).
local M = {}

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
M.command = os.getenv("BMDB_PROVIDER") or (here .. "fake-provider-cli")

local function quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- Runs `provider VERB args...`; returns its output, or raises with it.
function M.call(verb, ...)
  local argv = { quote(M.command), quote(verb) }
  for _, a in ipairs { ... } do argv[#argv + 1] = quote(a) end
  -- Lua 5.1's popen close gives no exit status: the shell appends it.
  local p = assert(io.popen(table.concat(argv, " ") .. " 2>&1; echo \"exit=$?\""))
  local out = p:read("*a")
  p:close()
  local text, code = out:match("^(.-)%s*exit=(%d+)%s*$")
  if code == "0" then return text end
  error("provider " .. verb .. " failed: " .. (text or out), 0)
end

return M
