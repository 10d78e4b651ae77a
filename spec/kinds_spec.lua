-- Error kinds: one list (host/lerror.h, BMDB_ERROR_KINDS), which Lua reads
-- as bmdb.core's kinds. Every kind the host or lua/ raises by name is in it.
local core = require "bmdb.core"

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

  it("lists every kind the sources raise by name", function()
    local patterns = {
      'lerror_raise_kind%([%w_>%-]+, "([%w_]+)"', 'lerror_push_kind%([%w_>%-]+, "([%w_]+)"',
      'raise%("([%w_]+)"', 'core%.error%("([%w_]+)"', 'is_error%([%w_.]+, "([%w_]+)"',
    }
    local missing, seen = {}, 0
    local list = assert(io.popen("ls host/*.c lua/*.lua lua/bmdb/*.lua"))
    for path in list:lines() do
      local f = assert(io.open(path))
      local text = f:read("*a")
      f:close()
      for _, p in ipairs(patterns) do
        for kind in text:gmatch(p) do
          seen = seen + 1
          if rawget(core.kinds, kind) == nil then missing[#missing + 1] = path .. ": " .. kind end
        end
      end
    end
    list:close()
    assert.is_true(seen > 10)
    assert.same({}, missing)
  end)
end)
