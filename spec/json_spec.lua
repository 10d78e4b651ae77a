-- bmdb.json (docs/talking-to-the-world.md, "JSON: bmdb.json"): in process, through build/bmdb/
-- core.so, and once in a script the binary runs.
local H = require "support.helpers"
local bmdb = require "bmdb"

local json = bmdb.json
local encode, decode, null = json.encode, json.decode, json.null

-- The error v raises when encoded (or s when decoded): kind json.
local function encode_error(v)
  local ok, err = pcall(encode, v)
  assert.is_false(ok, "expected encode to raise")
  assert.truthy(bmdb.is_error(err, "json"), tostring(err))
  return err
end

local function decode_error(s)
  local ok, err = pcall(decode, s)
  assert.is_false(ok, "expected decode to raise for " .. s)
  assert.truthy(bmdb.is_error(err, "json"), tostring(err))
  return err
end

local function nested(n)
  local t = {}
  local inner = t
  for _ = 2, n do
    inner[1] = {}
    inner = inner[1]
  end
  return t
end

describe("bmdb.json", function()
  describe("round trips", function()
    it("decodes and re-encodes nested documents to the same text", function()
      for _, s in ipairs {
        '{"a":[1,2,{"b":[true,false,null]}],"c":{"d":{"e":"f"}},"g":-1.5}',
        '[[[]],[{}],[[{"x":[[1]]}]]]',
        '"just a string"', "3", "-0", "true", "false", "null", "[]", "{}",
      } do
        assert.equal(s, encode(decode(s)))
      end
    end)

    it("gives back the Lua values it was given", function()
      local v = { name = "rack-7", ports = { 1, 2, 3 }, meta = { tags = { "a", "b" }, size = 1.25, ok = true } }
      local back = decode(encode(v))
      assert.equal("rack-7", back.name)
      assert.equal(3, #back.ports)
      assert.equal(3, back.ports[3])
      assert.equal("b", back.meta.tags[2])
      assert.equal(1.25, back.meta.size)
      assert.is_true(back.meta.ok)
      assert.equal(encode(v), encode(back))
    end)

    it("ignores whitespace between tokens", function()
      assert.equal('{"a":[1,2]}', encode(decode(' \t\r\n{ "a" : [ 1 , 2 ] } \n')))
    end)
  end)

  describe("null", function()
    it("keeps nulls in arrays, so their length holds", function()
      local t = decode("[1,null,3,null]")
      assert.equal(4, #t)
      assert.equal(null, t[2])
      assert.equal(null, t[4])
      assert.equal("[1,null,3,null]", encode(t))
    end)

    it("keeps keys whose value is null in objects", function()
      local t = decode('{"a":null,"b":1}')
      assert.equal(null, t.a)
      assert.equal('{"a":null,"b":1}', encode(t))
    end)

    it("writes nil and bmdb.json.null as null", function()
      assert.equal("null", encode(nil))
      assert.equal("null", encode(null))
      assert.equal("null", decode("null") == null and encode(decode("null")))
    end)
  end)

  describe("arrays and objects", function()
    it("tells an empty array from an empty object", function()
      assert.equal("{}", encode({}))
      assert.equal("[]", encode(json.array {}))
      assert.equal("[]", encode(json.array()))
      assert.equal("[]", encode(decode("[]")))
      assert.equal("{}", encode(decode("{}")))
      assert.equal('{"a":[],"b":{}}', encode(decode('{"a":[],"b":{}}')))
    end)

    it("marks what decode makes an array, and nothing else", function()
      local t = decode('[{"x":[]}]')
      assert.is_true(json.is_array(t))
      assert.is_false(json.is_array(t[1]))
      assert.is_true(json.is_array(t[1].x))
      assert.is_false(json.is_array({ 1, 2 }))
      assert.is_false(json.is_array("[]"))
    end)

    it("array(t) marks t and returns it", function()
      local t = { 1, 2 }
      assert.equal(t, json.array(t))
      assert.is_true(json.is_array(t))
      assert.equal(t, json.array(t)) -- marking twice is fine
    end)

    it("array refuses what it cannot mark, as a usage error", function()
      local ok, err = pcall(function()
        local t = json.array("x")
        return t
      end)
      assert.is_false(ok)
      assert.truthy(bmdb.is_error(err, "usage"))
      assert.matches("json_spec.lua:%d+: bad argument #1 to 'array' %(table expected, got string%)", err.message)
      ok, err = pcall(json.array, setmetatable({}, {}))
      assert.is_false(ok)
      assert.truthy(bmdb.is_error(err, "usage"))
      assert.matches("the table has a metatable of its own", err.message, 1, true)
    end)

    it("writes a table whose keys are exactly 1..n as an array, any other as an object", function()
      assert.equal("[1,2,3]", encode({ 1, 2, 3 }))
      assert.equal('{"1":"a","2":"b","x":true}', encode({ "a", "b", x = true }))
      assert.equal('{"-1":3,"0":1,"1.5":2}', encode({ [0] = 1, [1.5] = 2, [-1] = 3 }))
      assert.equal('{"1":true}', encode(decode('{"1":true}'))) -- a string key stays one
    end)

    it("writes object keys sorted by their bytes, at every level", function()
      local v = { b = 1, a = 2, c = { z = 1, y = 2, x = { "k" } }, ["10"] = 0, ["9"] = 0, B = 0, ["é"] = 0, [""] = 0 }
      assert.equal('{"":0,"10":0,"9":0,"B":0,"a":2,"b":1,"c":{"x":["k"],"y":2,"z":1},"é":0}', encode(v))
      -- the same text however the table was built
      local w = {}
      for _, k in ipairs { "é", "c", "a", "b", "B", "9", "10", "" } do w[k] = v[k] end
      assert.equal(encode(v), encode(w))
    end)

    it("nests 1000 deep, both ways", function()
      local s = string.rep("[", 1000) .. string.rep("]", 1000)
      assert.equal(s, encode(decode(s)))
      assert.equal(string.rep("[", 999) .. "{}" .. string.rep("]", 999), encode(nested(1000)))
    end)
  end)

  describe("strings", function()
    it("escapes quotes, backslashes and control characters, and nothing else", function()
      assert.equal([["a\"b\\c/d"]], encode('a"b\\c/d'))
      assert.equal([["\n\t\r\b\f"]], encode("\n\t\r\b\f"))
      assert.equal('"\\u0000\\u0001\\u001f\\u000b x\127"', encode("\0\1\31\11 x\127"))
    end)

    it("keeps UTF-8 bytes as they are, both ways", function()
      local s = "é 日本 😀"
      assert.equal('"' .. s .. '"', encode(s))
      assert.equal(s, decode('"' .. s .. '"'))
      assert.equal("\255\254", decode('"\255\254"')) -- bytes, not checked as UTF-8
    end)

    it("decodes every escape, \\u ones to UTF-8", function()
      assert.equal('"\\/\b\f\n\r\t', decode([["\"\\\/\b\f\n\r\t"]]))
      assert.equal("A\0é€", decode([["\u0041\u0000\u00e9\u20AC"]]))
      assert.equal("\u{7ff}\u{800}\u{ffff}", decode([["\u07ff\u0800\uffff"]]))
    end)

    it("decodes surrogate pairs to one character", function()
      assert.equal("😀", decode([["\ud83d\ude00"]]))
      assert.equal("x\u{10000}y\u{10ffff}z", decode([["x\uD800\uDC00y\uDBFF\uDFFFz"]]))
      assert.equal('"😀"', encode(decode([["\ud83d\ude00"]])))
    end)
  end)

  describe("numbers", function()
    it("writes integral values whole, exactly", function()
      assert.equal("9007199254740992", encode(2 ^ 53))
      assert.equal("-9007199254740992", encode(-2 ^ 53))
      assert.equal("9007199254740994", encode(2 ^ 53 + 2))
      assert.equal("123456789012345", encode(123456789012345))
      assert.equal("99999999999999984", encode(99999999999999984)) -- just below 1e17
      assert.equal("0", encode(0))
      assert.equal("-0", encode(-0.0))
    end)

    it("writes others in the fewest of 15, 16 or 17 digits that read back the same", function()
      assert.equal("0.1", encode(0.1))
      assert.equal("0.30000000000000004", encode(0.1 + 0.2))
      assert.equal("1e+300", encode(1e300))
      assert.equal("1e+17", encode(1e17))
      assert.equal("-1.5e-07", encode(-1.5e-7))
      assert.equal("4.94065645841247e-324", encode(5e-324)) -- 15 digits at least, as documented
      assert.equal(5e-324, decode(encode(5e-324)))
      assert.equal(2.2250738585072014e-308, decode(encode(2.2250738585072014e-308)))
      assert.equal(1.7976931348623157e308, decode(encode(1.7976931348623157e308)))
    end)

    it("reads numbers back to the same double", function()
      assert.equal(2 ^ 53, decode("9007199254740992"))
      assert.equal(-2 ^ 53, decode("-9007199254740992"))
      assert.equal(2 ^ 53, decode("9007199254740993")) -- not a double: rounds to even
      assert.equal(1e300, decode("1e300"))
      assert.equal(5e-324, decode("5e-324"))
      assert.equal(0.1, decode("0.1"))
      assert.equal(123456789012345, decode("123456789012345"))
      assert.equal(1.5, decode("15E-1"))
      assert.equal(150, decode("1.5e+2"))
      assert.equal(1 / 0, 1 / decode("0"))
      assert.equal(-1 / 0, 1 / decode("-0"))
      assert.equal(0.1, decode("0." .. string.rep("0", 100) .. "1e100")) -- a long number
    end)

    it("round-trips doubles across the range", function()
      math.randomseed(53)
      for _ = 1, 5000 do
        local x = (math.random() - 0.5) * 10 ^ math.random(-320, 308)
        local s = encode(x)
        assert.equal(x, decode(s), s)
        assert.equal(s, encode(decode(s)))
      end
    end)
  end)

  describe("encode errors", function()
    it("names what and where", function()
      local err = encode_error { devices = { {}, { cb = print } } }
      assert.equal("json: cannot encode a function at $.devices[2].cb", err.message)
      assert.equal("$.devices[2].cb", err.path)
      assert.equal("json: cannot encode a function at $.devices[2].cb", tostring(err))
      assert.equal('json: cannot encode a userdata at $["a b"][1]["x\\"y"]',
        encode_error({ ["a b"] = { { ['x"y'] = io.stdout } } }).message)
      assert.equal("json: cannot encode a thread at $", encode_error(coroutine.create(print)).message)
    end)

    it("refuses NaN and infinities", function()
      assert.equal("json: cannot encode NaN at $.x", encode_error({ x = 0 / 0 }).message)
      assert.equal("json: cannot encode an infinite number at $[2]", encode_error({ 1, 1 / 0 }).message)
      assert.equal("json: cannot encode an infinite number at $", encode_error(-1 / 0).message)
      assert.equal("json: cannot encode an infinite number as a table key at $.t", encode_error({ t = { [1 / 0] = 1 } }).message)
    end)

    it("refuses sparse arrays and keys that are neither strings nor numbers", function()
      assert.equal("json: cannot encode a sparse array (2 elements, largest index 3) at $.a",
        encode_error({ a = { [1] = 1, [3] = 3 } }).message)
      assert.equal("json: cannot encode a sparse array (1 elements, largest index 2) at $", encode_error({ [2] = 1 }).message)
      assert.equal("json: cannot encode a table key of type boolean at $.k", encode_error({ k = { [true] = 1 } }).message)
      assert.equal("json: cannot encode a table key of type table at $", encode_error({ [{}] = 1 }).message)
      assert.equal("json: an array (bmdb.json.array) has a key that is not an index at $",
        encode_error(json.array { 1, x = 2 }).message)
      assert.equal('json: two keys of one table are both written as "1" at $.o',
        encode_error({ o = { [1] = 1, ["1"] = 2, x = 0 } }).message)
    end)

    it("refuses cycles, and nesting deeper than 1000", function()
      local t = { a = { {} } }
      t.a[1].back = t
      assert.equal("json: cannot encode a table that contains itself at $.a[1].back", encode_error(t).message)
      local shared = { 1 } -- the same table twice is no cycle
      assert.equal('{"x":[1],"y":[1]}', encode({ x = shared, y = shared }))
      local ones = string.rep("[1]", 10)
      assert.equal("json: cannot encode tables nested deeper than 1000 at $" .. ones .. "...(980 more)..." .. ones,
        encode_error(nested(1001)).message)
    end)

    it("needs a value", function()
      local ok, err = pcall(function()
        local s = encode()
        return s
      end)
      assert.is_false(ok)
      assert.truthy(bmdb.is_error(err, "usage"))
      assert.matches("bad argument #1 to 'encode' (value expected)", err.message, 1, true)
    end)
  end)

  describe("decode errors", function()
    local cases = {
      { "", "unexpected end of input at line 1, column 1 (byte 1)" },
      { "  \n ", "unexpected end of input at line 2, column 2 (byte 5)" },
      { '{"a": x}', "unexpected character 'x' at line 1, column 7 (byte 7)" },
      { "[1] x", "unexpected character 'x' at line 1, column 5 (byte 5)" },
      { "[1]]", "unexpected character ']' at line 1, column 4 (byte 4)" },
      { "1 2", "unexpected character '2' at line 1, column 3 (byte 3)" },
      { "[1,]", "unexpected character ']' at line 1, column 4 (byte 4)" },
      { '{"a":1,}', "unexpected character '}' at line 1, column 8 (byte 8)" },
      { "{'a':1}", "unexpected character ''' at line 1, column 2 (byte 2)" },
      { "{a:1}", "unexpected character 'a' at line 1, column 2 (byte 2)" },
      { '{"a" 1}', "unexpected character '1' at line 1, column 6 (byte 6)" },
      { "[1 2]", "unexpected character '2' at line 1, column 4 (byte 4)" },
      { "[", "unexpected end of input at line 1, column 2 (byte 2)" },
      { '{"a":1', "unexpected end of input at line 1, column 7 (byte 7)" },
      { "\239\187\191{}", "unexpected byte 0xef at line 1, column 1 (byte 1)" },
      { "[\1]", "unexpected byte 0x01 at line 1, column 2 (byte 2)" },
      { "tru", "unexpected end of input at line 1, column 4 (byte 4)" },
      { "nulL", "unexpected character 'L' at line 1, column 4 (byte 4)" },
      { "True", "unexpected character 'T' at line 1, column 1 (byte 1)" },
      { "01", "unexpected character '1' at line 1, column 2 (byte 2)" },
      { "-", "unexpected end of input at line 1, column 2 (byte 2)" },
      { "-a", "unexpected character 'a' at line 1, column 2 (byte 2)" },
      { "+1", "unexpected character '+' at line 1, column 1 (byte 1)" },
      { ".5", "unexpected character '.' at line 1, column 1 (byte 1)" },
      { "1.", "unexpected end of input at line 1, column 3 (byte 3)" },
      { "1.e5", "unexpected character 'e' at line 1, column 3 (byte 3)" },
      { "1e", "unexpected end of input at line 1, column 3 (byte 3)" },
      { "1e+", "unexpected end of input at line 1, column 4 (byte 4)" },
      { "0x10", "unexpected character 'x' at line 1, column 2 (byte 2)" },
      { "NaN", "unexpected character 'N' at line 1, column 1 (byte 1)" },
      { "[1e400]", "number out of range (1e400) at line 1, column 2 (byte 2)" },
      { "-1e400", "number out of range (-1e400) at line 1, column 1 (byte 1)" },
      { '"abc', "unexpected end of input in a string at line 1, column 5 (byte 5)" },
      { '"a\\"', "unexpected end of input in a string at line 1, column 5 (byte 5)" },
      { '["a\nb"]', "unescaped control character 0x0a in a string at line 1, column 4 (byte 4)" },
      { '"\\n\t"', "unescaped control character 0x09 in a string at line 1, column 4 (byte 4)" },
      { '"\\q"', "invalid escape '\\q' in a string at line 1, column 2 (byte 2)" },
      { '"\\', "unexpected end of input at line 1, column 3 (byte 3)" },
      { '"\\u12"', "unexpected character '\"' at line 1, column 6 (byte 6)" },
      { '"\\u12g4"', "unexpected character 'g' at line 1, column 6 (byte 6)" },
      { '"\\ud83d"', "lone high surrogate in a \\u escape at line 1, column 2 (byte 2)" },
      { '"\\ud83dx"', "lone high surrogate in a \\u escape at line 1, column 2 (byte 2)" },
      { '"\\ud83d\\u0041"', "lone high surrogate in a \\u escape at line 1, column 2 (byte 2)" },
      { '"ab\\ude00"', "lone low surrogate in a \\u escape at line 1, column 4 (byte 4)" },
      { '{"a":1,\n "a":2}', 'duplicate key "a" at line 2, column 2 (byte 10)' },
      { string.rep("[", 1001), "nesting deeper than 1000 at line 1, column 1001 (byte 1001)" },
      { string.rep('{"a":', 1001), "nesting deeper than 1000 at line 1, column 5001 (byte 5001)" },
    }
    for _, case in ipairs(cases) do
      it(string.format("%q: %s", case[1]:sub(1, 24), case[2]), function()
        local err = decode_error(case[1])
        assert.equal("json: " .. case[2], err.message)
        local line, column, byte = case[2]:match("line (%d+), column (%d+) %(byte (%d+)%)$")
        assert.same({ tonumber(line), tonumber(column), tonumber(byte) }, { err.line, err.column, err.byte })
      end)
    end

    it("counts lines and columns in bytes", function()
      local err = decode_error('[\n  "é",\n  "é" x]')
      assert.equal("json: unexpected character 'x' at line 3, column 8 (byte 18)", err.message)
    end)

    it("takes a string only, as a usage error", function()
      for _, v in ipairs { 5, true, {} } do
        local ok, err = pcall(function()
          local r = decode(v)
          return r
        end)
        assert.is_false(ok)
        assert.truthy(bmdb.is_error(err, "usage"))
        assert.matches("json_spec.lua:%d+: bad argument #1 to 'decode' %(string expected, got " .. type(v) .. "%)",
          err.message)
      end
    end)
  end)

  -- In a process of its own: a locale changes the whole process.
  it("refuses to work under a locale whose decimal point is a comma", function()
    local dir = H.tmpdir("locale")
    local code = H.run({ "localedef", "-i", "de_DE", "-f", "UTF-8", dir .. "/de_DE.UTF-8" })
    if code ~= 0 then
      pending("localedef cannot build de_DE here (no locale sources)")
      return
    end
    local code2, out, err = H.run({ "luajit", "-e", string.format("package.cpath = %q", H.root .. "/build/?.so") .. [[
      local core = require "bmdb.core"
      assert(os.setlocale("de_DE.UTF-8", "numeric"))
      for _, f in ipairs { function() return core.json_encode(0.5) end, function() return core.json_decode("0.5") end } do
        local ok, e = pcall(f)
        print(ok, e.kind, e.message)
      end
    ]] }, { env = { LOCPATH = dir } })
    assert.equal(0, code2, err)
    local refused = "false\tjson\tjson: the locale's decimal point is not '.' (os.setlocale changed LC_NUMERIC)\n"
    assert.equal(refused .. refused, out)
  end)

  describe("in a script the binary runs", function()
    local dsn, dir

    setup(function()
      dsn = H.postgres():create_db()
      assert.equal(0, (H.run({ H.bin, "migrate" }, { env = { BMDB_DSN = dsn } })))
      dir = H.tmpdir("json")
    end)

    it("encodes and decodes as it does here", function()
      local path = dir .. "/json.lua"
      H.write_file(path, [[
        local bmdb = require "bmdb"
        local j = bmdb.json
        local v = j.decode('[1,null,{"b":[],"a":{}}]')
        print(j.encode { n = 2 ^ 53, f = 0.1, e = j.array(), o = {}, s = "é\n", v = v, null = j.null })
        local ok, err = pcall(j.encode, { x = { print } })
        print(err.kind, err.message)
        -- the error paths and a growing buffer, for a sanitized build
        local big = string.rep("é\n\"x", 50000)
        assert(j.decode(j.encode { big, big })[2] == big)
        for _, s in ipairs { "[1,]", '"\\ud800"', string.rep("[", 1001), '"' .. big:gsub("\n", "\\n"):gsub('"', '\\"') .. '\\q"' } do
          ok, err = pcall(j.decode, s)
          assert(not ok and err.kind == "json", tostring(err))
        end
        print("errors raised")
      ]])
      local code, out, err = H.run({ H.bin, path }, { env = { BMDB_DSN = dsn } })
      assert.equal(0, code, err)
      assert.equal('{"e":[],"f":0.1,"n":9007199254740992,"null":null,"o":{},"s":"é\\n","v":[1,null,{"a":{},"b":[]}]}\n'
        .. "json\tjson: cannot encode a function at $.x[1]\nerrors raised\n", out)
    end)
  end)
end)
