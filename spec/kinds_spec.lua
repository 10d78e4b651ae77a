-- Error kinds: one list (host/lerror.h, BMDB_ERROR_KINDS), which Lua reads
-- as bmdb.core's kinds. The sources name a kind by its constant
-- (BMDB_E_<ID> in C, core.kinds.<name> in Lua, as `local K = core.kinds`
-- then K.<name>), never by a bare string, so a misspelt one fails at once.
local core = require "bmdb.core"

-- Each source file's path and text.
local function sources()
  local files = {}
  local list = assert(io.popen("ls host/*.c lua/*.lua lua/bmdb/*.lua"))
  for path in list:lines() do
    local f = assert(io.open(path))
    files[#files + 1] = { path = path, text = f:read("*a") }
    f:close()
  end
  list:close()
  return files
end

describe("error kinds", function()
  it("names each kind by itself", function()
    local n = 0
    for name, v in pairs(core.kinds) do
      assert.equal(name, v)
      n = n + 1
    end
    assert.is_true(n > 10)
    assert.equal("usage", core.kinds.usage)
    assert.equal("memory", core.kinds.memory)
  end)

  it("raises usage for a name that is not a kind", function()
    local ok, err = pcall(function() return core.kinds.usgae end)
    assert.is_false(ok)
    assert.equal("usage", err.kind)
    assert.matches("usgae is not an error kind", err.message, 1, true)
    assert.is_nil(rawget(core.kinds, "usgae"))
  end)

  it("lists every kind the sources name", function()
    local missing, seen = {}, { c = 0, lua = 0 }
    local function check(path, kind, lang)
      seen[lang] = seen[lang] + 1
      if rawget(core.kinds, kind) == nil then missing[#missing + 1] = path .. ": " .. kind end
    end
    for _, f in ipairs(sources()) do
      if f.path:match("%.c$") then
        -- (less the macros that make the constants: lerror.c's BMDB_E_DEFINE)
        local macros = {}
        for id in f.text:gmatch("#define BMDB_E_([%u_]+)%(") do macros[id] = true end
        for id in f.text:gmatch("BMDB_E_([%u_]+)") do
          if not macros[id] then check(f.path, id:lower(), "c") end
        end
      elseif f.text:match("\nlocal K = core%.kinds\n") then
        for kind in f.text:gmatch("%f[%w_]K%.([%w_]+)") do check(f.path, kind, "lua") end
      end
    end
    assert.is_true(seen.c > 10)
    assert.is_true(seen.lua > 10)
    assert.same({}, missing)
  end)

  it("is never named by a bare string", function()
    local patterns = {
      'lerror_raise_kind%([%w_>%-]+, "([%w_]+)"', 'lerror_push_kind%([%w_>%-]+, "([%w_]+)"', 'strcmp%(k, "([%w_]+)"',
      'raise%("([%w_]+)"', 'core%.error%("([%w_]+)"', 'is_error%([%w_.]+, "([%w_]+)"', '%.kind [=~]= "([%w_]+)"',
    }
    local bare = {}
    for _, f in ipairs(sources()) do
      for _, p in ipairs(patterns) do
        for name in f.text:gmatch(p) do
          -- (a limit's kind, "rate", is no error kind)
          if rawget(core.kinds, name) then bare[#bare + 1] = f.path .. ": " .. name end
        end
      end
    end
    assert.same({}, bare)
  end)
end)
