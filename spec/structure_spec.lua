-- The layout host/README.md promises, checked so that it cannot drift:
-- every C file opens with a comment on its purpose and stays under 800
-- lines, no two modules include each other (directly or through others),
-- and every mutex of host/ is in the lock table.
local H = require "support.helpers"

local function host_files()
  local files = {}
  local p = io.popen("ls " .. H.root .. "/host")
  for name in p:lines() do
    if name:match("%.[ch]$") then files[#files + 1] = name end
  end
  p:close()
  table.sort(files)
  return files
end

local function read(name)
  local f = assert(io.open(H.root .. "/host/" .. name))
  local s = f:read("*a")
  f:close()
  return s
end

describe("host/ layout", function()
  local files = host_files()

  it("finds the sources", function()
    assert.is_true(#files > 40, #files .. " files")
  end)

  it("opens every file with a comment on its purpose, and keeps each .c under 800 lines", function()
    local bad = {}
    for _, name in ipairs(files) do
      local s = read(name)
      if not s:match("^/%* " .. name:gsub("%.", "%%.") .. " %-%- ") then
        bad[#bad + 1] = name .. ": does not open with '/* " .. name .. " -- purpose'"
      end
      local _, lines = s:gsub("\n", "")
      if name:match("%.c$") and lines > 800 then bad[#bad + 1] = name .. ": " .. lines .. " lines" end
    end
    assert.same({}, bad)
  end)

  it("has no include cycle between modules", function()
    local deps = {}
    for _, name in ipairs(files) do
      local m = name:gsub("%.[ch]$", "")
      deps[m] = deps[m] or {}
      for inc in read(name):gmatch('#include "([%w_]+)%.h"') do
        if inc ~= m then deps[m][inc] = true end
      end
    end
    -- a depth-first search that reports the first path back to its start
    local function path_back(start)
      local seen, stack = {}, {}
      local function visit(m)
        for d in pairs(deps[m] or {}) do
          stack[#stack + 1] = d
          if d == start then return true end
          if not seen[d] then
            seen[d] = true
            if visit(d) then return true end
          end
          stack[#stack] = nil
        end
      end
      if visit(start) then return start .. " -> " .. table.concat(stack, " -> ") end
    end
    local cycles = {}
    for m in pairs(deps) do
      local p = path_back(m)
      if p then cycles[#cycles + 1] = p end
    end
    table.sort(cycles)
    assert.same({}, cycles)
  end)

  local function host_readme()
    local f = assert(io.open(H.root .. "/host/README.md"))
    local s = f:read("*a")
    f:close()
    return s
  end

  it("names every C file in host/README.md", function()
    local readme, missing = host_readme(), {}
    for _, name in ipairs(files) do
      if name:match("%.c$") and not readme:find("`" .. name .. "`", 1, true) then missing[#missing + 1] = name end
    end
    assert.same({}, missing)
  end)

  it("lists every mutex in host/README.md's lock table", function()
    local readme = host_readme()
    local table_text = readme:match("## Locks and their order(.-)\n## ")
    assert.is_truthy(table_text, "host/README.md has a section 'Locks and their order'")
    local missing = {}
    for _, name in ipairs(files) do
      for mu in read(name):gmatch("pthread_mutex_t%s+([%w_]+)") do
        local row = "`" .. mu .. "`"
        if not table_text:find(row, 1, true) then missing[#missing + 1] = name .. ": " .. mu end
      end
    end
    assert.same({}, missing)
  end)
end)
