-- Log lines: always whole, whatever their size.
local H = require "support.helpers"
local core = require "bmdb.core"

-- true when s is valid UTF-8 (a line cut inside a character is not)
local function utf8_valid(s)
  local i, n = 1, #s
  while i <= n do
    local c = s:byte(i)
    local len = c < 0x80 and 1 or c >= 0xF0 and 4 or c >= 0xE0 and 3 or c >= 0xC0 and 2 or 0
    if len == 0 or i + len - 1 > n then return false end
    for j = i + 1, i + len - 1 do
      local b = s:byte(j)
      if b < 0x80 or b > 0xBF then return false end
    end
    i = i + len
  end
  return true
end

describe("log lines", function()
  local dsn, admin, script

  setup(function()
    dsn = H.postgres():create_db()
    assert.equal(0, (H.run({ H.bin, "migrate" }, { env = { BMDB_DSN = dsn } })))
    admin = core.connect(dsn)
    script = H.tmpdir("log") .. "/long.lua"
    -- Longer than a line's 8 KB, with escapes and two-byte characters
    -- everywhere a cut could fall.
    H.write_file(script, [[
      local bmdb = require "bmdb"
      local big = string.rep('ab"\\\n\t\1\195\169 =', 1500)
      bmdb.log.info(big, { field = "short" })
      bmdb.log.info("a long field", { big = big, zafter = "x" })
      bmdb.log.info("done")
    ]])
  end)

  teardown(function() admin:close() end)

  local function lines(text)
    assert.equal("\n", text:sub(-1), "the log ends with a newline")
    local out = {}
    for l in text:gmatch("([^\n]*)\n") do out[#out + 1] = l end
    return out
  end

  it("in JSON are valid JSON objects ending in } and a newline, marked when cut", function()
    local code, _, err = H.run({ H.bin, "--log-format", "json", script }, { env = { BMDB_DSN = dsn } })
    assert.equal(0, code, err)
    local cut, done = 0, false
    for _, l in ipairs(lines(err)) do
      assert.is_true(#l < 8192, "line of " .. #l .. " bytes")
      assert.is_true(utf8_valid(l), "invalid UTF-8 in: " .. l:sub(1, 200))
      -- the server's JSON parser is the judge
      local row = admin:one([[SELECT j->>'msg' AS msg, j->>'truncated' AS truncated, j->>'level' AS level
                              FROM (SELECT $1::jsonb AS j) q]], l)
      assert.equal("info", row.level)
      if row.truncated then
        assert.equal("true", row.truncated)
        cut = cut + 1
      end
      done = done or row.msg == "done"
    end
    assert.equal(2, cut)
    assert.is_true(done, "the line after the long ones is whole")
  end)

  it("in logfmt end with a newline, marked when cut", function()
    local code, _, err = H.run({ H.bin, script }, { env = { BMDB_DSN = dsn } })
    assert.equal(0, code, err)
    local cut = 0
    for _, l in ipairs(lines(err)) do
      assert.is_true(#l < 8192, "line of " .. #l .. " bytes")
      assert.is_true(utf8_valid(l), "invalid UTF-8 in: " .. l:sub(1, 200))
      assert.matches("^time=%S+ level=info msg=", l)
      if l:find(" truncated=true$") then cut = cut + 1 end
    end
    assert.equal(2, cut)
    assert.matches(" msg=done\n", err, 1, true)
  end)

  -- Field values are written as tostring writes them, whatever their type
  -- (strings and numbers are taken as they are, the rest through tostring).
  it("write each field's value as tostring would", function()
    local fields = H.tmpdir("log") .. "/fields.lua"
    H.write_file(fields, [[
      local bmdb = require "bmdb"
      local t = setmetatable({}, { __tostring = function() return "T" end })
      bmdb.log.info("fields", { n = 3, f = 0.5, big = 2^53, b = false, s = "x y", t = t })
    ]])
    local code, _, err = H.run({ H.bin, fields }, { env = { BMDB_DSN = dsn } })
    assert.equal(0, code, err)
    assert.matches(' msg=fields b=false big=9.007199254741e+15 f=0.5 n=3 s="x y" t=T\n', err, 1, true)
  end)
end)
