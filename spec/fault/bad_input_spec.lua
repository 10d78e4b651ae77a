-- Fault suite, guarantee 8: bad input, table-driven. Flags, DSNs, scripts,
-- bodies, SQL values, ids, process names, a changed migration and an
-- unusable data dir: each is refused with a non-zero exit or a raised
-- error whose message names the problem (a password never appears), and
-- the rows committed before are all still there at the end.
local H = require "support.helpers"
local F = require "support.faults"
local core = require "bmdb.core"

local SECRET = "S3cretPW4"

describe("fault: bad input", function()
  local dsn, admin, dir, bmdb, machine
  local tried, refused = 0, 0

  setup(function()
    dsn, admin = F.database()
    dir = H.tmpdir("fault-bad")
    admin:exec("CREATE TABLE kept (k TEXT NOT NULL, v TEXT)")
    for i = 1, 3 do admin:exec("INSERT INTO kept (k) VALUES ($1)", "row" .. i) end
    machine = F.machines(admin, 3, 1)[1]
    core.open { dsn = dsn, component = "bad_input", interval = 2, log_level = "error" }
    bmdb = require "bmdb"
  end)

  teardown(function()
    F.figures("bad input", { bad_inputs = tried, faults = tried, survived = refused })
    core.close()
    admin:close()
  end)

  local function file(name, content, mode)
    local p = dir .. "/" .. name
    H.write_file(p, content)
    if mode then os.execute("chmod " .. mode .. " " .. p) end
    return p
  end

  -- the host, as the operator runs it; returns exit code and all output
  local function host(argv, opts)
    opts = opts or {}
    local full = { H.bin }
    for _, a in ipairs(argv) do full[#full + 1] = a end
    local env = { BMDB_DSN = opts.dsn == nil and dsn or opts.dsn or false, MACHINE = machine }
    for k, v in pairs(opts.env or {}) do env[k] = v end
    local p = H.spawn { argv = full, env = env, user = opts.user }
    local code = p:wait(opts.timeout or 60)
    return code, p:output()
  end

  local function refused_with(want_code, pattern, code, out)
    tried = tried + 1
    if want_code then assert.equal(want_code, code, out) else assert.not_equal(0, code, out) end
    assert.matches(pattern, out)
    assert.not_matches(SECRET, out, 1, true)
    refused = refused + 1
  end

  -- ------------------------------------------------------------ flags
  local valid = [[local bmdb = require "bmdb"
return { bmdb.worker { process = "Ok", select = function(tx, n) return {} end, run = function(w) end } }]]
  local flags = {
    { { "--interval" }, "%-%-interval" },
    { { "--interval", "abc" }, "%-%-interval" },
    { { "--interval", "0" }, "%-%-interval" },
    { { "--interval", "-5" }, "%-%-interval" },
    { { "--interval", "99999999999999999999" }, "%-%-interval" },
    { { "--grace", "nan" }, "%-%-grace" },
    { { "--log-level", "loud" }, "loud" },
    { { "--log-format", "xml" }, "xml" },
    { { "--bogus" }, "%-%-bogus" },
  }
  for _, c in ipairs(flags) do
    it("refuses the flags " .. table.concat(c[1], " "), function()
      local argv = {}
      for _, a in ipairs(c[1]) do argv[#argv + 1] = a end
      argv[#argv + 1] = file("valid.lua", valid)
      refused_with(2, c[2], host(argv))
    end)
  end

  it("refuses a command line without a script", function()
    refused_with(2, "script", host({}))
  end)

  -- ------------------------------------------------------------ DSNs
  local dsns = {
    { "postgresql://u:" .. SECRET .. "@[::1:5432/x", "DSN" },
    { "postgresql://u:S3cret%zzPW4@127.0.0.1:1/x", "DSN" },
    { "host=127.0.0.1 port=1 user=u password=" .. SECRET .. " dbname=x", "127%.0%.0%.1" },
    { "password=" .. SECRET .. " bogus_keyword=1", "invalid connection option" },
    { "host=/nonexistent-dir password=" .. SECRET, "nonexistent%-dir" },
    { "postgresql://u:" .. SECRET .. "@127.0.0.1:1/x?sslmode=bogus", "sslmode" },
  }
  for i, c in ipairs(dsns) do
    it("names the problem with DSN " .. i .. " and never shows its password (--dsn, BMDB_DSN, status)", function()
      local script = file("valid.lua", valid)
      refused_with(nil, c[2], host({ "--dsn", c[1], script }, { dsn = false }))
      refused_with(nil, c[2], host({ script }, { dsn = c[1] }))
      refused_with(nil, c[2], host({ "status" }, { dsn = c[1] }))
    end)
  end

  -- ------------------------------------------------------------ scripts
  local scripts = {
    { "a missing script", function() return dir .. "/missing.lua" end, 2, "missing%.lua" },
    { "a directory", function() return dir end, 2, "director" },
    { "a syntax error", function() return file("syntax.lua", "return {\n  bmdb.worker {\n") end, 2, "syntax%.lua:%d" },
    { "an error at load", function() return file("load.lua", "error('boom at load')") end, false, "boom at load" },
    { "a zero concurrency", function() return file("conc.lua", valid:gsub('process = "Ok",', 'process = "Ok", concurrency = 0,')) end, 2, "concurrency" },
    { "an unknown field", function() return file("field.lua", valid:gsub('process = "Ok",', 'process = "Ok", colour = 1,')) end, 2, "colour" },
    { "an invalid process name", function() return file("proc.lua", valid:gsub('"Ok"', '"bad name!"')) end, 2, "process" },
    { "a run that is not a function", function() return file("run.lua", valid:gsub("run = function%(w%) end", "run = 42")) end, 2, "run" },
    { "a NaN poll", function() return file("poll.lua", valid:gsub('process = "Ok",', 'process = "Ok", poll = 0/0,')) end, 2, "poll" },
    { "an infinite batch", function() return file("batch.lua", valid:gsub('process = "Ok",', 'process = "Ok", batch = math.huge,')) end, 2, "batch" },
  }
  for _, c in ipairs(scripts) do
    it("refuses " .. c[1] .. " (run and check)", function()
      local path = c[2]()
      -- false: any non-zero status (an error at load is a run-time failure)
      refused_with(c[3] or nil, c[4], host({ path }))
      refused_with(c[3] == false and nil or c[3], c[4], host({ "check", path }))
    end)
  end

  it("refuses an unreadable script", function()
    local path = file("secret.lua", valid, "000")
    local user
    for line in io.lines("/etc/passwd") do
      local name, uid, gid = line:match("^([^:]+):[^:]*:(%d+):(%d+):")
      if name == "nobody" then user = { uid = tonumber(uid), gid = tonumber(gid) } end
    end
    refused_with(2, "secret%.lua", host({ "check", path }, { user = user }))
  end)

  it("reports a select that returns garbage, names it, and keeps running", function()
    local path = file("garbage.lua", valid:gsub("return {} end", "return 'garbage' end"))
    local p = H.spawn { argv = { H.bin, "--interval", "2", path }, env = { BMDB_DSN = dsn } }
    p:await("stderr", "select", 30)
    tried = tried + 1
    assert.matches("select", p:stderr())
    assert.is_true(p:running())
    p:kill("TERM")
    assert.equal(0, p:wait(60), p:stderr())
    refused = refused + 1
  end)

  -- ------------------------------------------------------------ bodies
  -- one-off scripts that work the machine once: the body's failure is
  -- recorded and the host exits non-zero
  local bodies = {
    { "raising a table", "error({ code = 42 })", 1, "code" },
    { "raising nil", "error(nil)", 1, "nil" },
    { "deciding twice", "w:finish(); w:finish()", 1, "already decided" },
    { "a huge allocation", "local s = string.rep('x', 2^31 - 100)", 1, "memory" },
    { "os.exit(3)", "os.exit(3)", 3, "." },
  }
  for _, c in ipairs(bodies) do
    it("settles a body " .. c[1], function()
      local path = file("body.lua", [[
        local bmdb = require "bmdb"
        bmdb.work(os.getenv("MACHINE"), "Body", function(w) ]] .. c[2] .. [[ end)]])
      local before = admin:count("SELECT 1 FROM work_history WHERE machine_id = $1", machine)
      refused_with(c[3], c[4], host({ "--interval", "2", path }, { timeout = 90 }))
      -- the item was recorded, not left held
      assert.equal(0, admin:count("SELECT 1 FROM work WHERE machine_id = $1", machine))
      assert.is_true(admin:count("SELECT 1 FROM work_history WHERE machine_id = $1", machine) > before)
      admin:exec("DELETE FROM work_backoff WHERE machine_id = $1", machine)
    end)
  end

  it("rolls back a transaction a body left open by yielding inside it, and says so", function()
    local path = file("yield.lua", [[
      local bmdb = require "bmdb"
      bmdb.work(os.getenv("MACHINE"), "Yield", function(w)
        local co = coroutine.wrap(function()
          w:finish(function(tx)
            tx:exec("INSERT INTO kept (k) VALUES ('yielded')")
            coroutine.yield()
          end)
        end)
        co()
      end)]])
    local code, out = host({ "--interval", "2", path }, { timeout = 90 })
    tried = tried + 1
    assert.matches("coroutine", out)
    assert.equal(0, admin:count("SELECT 1 FROM kept WHERE k = 'yielded'"), out)
    assert.equal(0, admin:count("SELECT 1 FROM work WHERE machine_id = $1", machine))
    assert.is_true(code == 0 or code == 1, out)
    refused = refused + 1
  end)

  it("records a raised table readably, not as an address", function()
    local cause = admin:one([[SELECT cause FROM work_history WHERE machine_id = $1 AND event = 'Failed'
      AND cause LIKE '%code%' LIMIT 1]], machine)
    tried = tried + 1
    assert.is_not_nil(cause)
    assert.not_matches("table: 0x", cause.cause, 1, true)
    refused = refused + 1
  end)

  it("stops a busy loop compiled by the JIT at shutdown, ending the session (exit 4)", function()
    local path = file("busy.lua", [[
      local bmdb = require "bmdb"
      bmdb.work(os.getenv("MACHINE"), "Busy", function(w)
        io.stdout:write("busy\n"); io.stdout:flush()
        local x = 0
        while true do x = x + 1 end
      end)]])
    local p = H.spawn { argv = { H.bin, "--interval", "2", path }, env = { BMDB_DSN = dsn, MACHINE = machine } }
    p:await("stdout", "busy", 30)
    p:kill("TERM")
    tried = tried + 1
    assert.equal(4, p:wait(90), p:stderr())
    assert.equal(0, admin:count("SELECT 1 FROM work WHERE machine_id = $1", machine))
    refused = refused + 1
  end)

  -- ------------------------------------------------------------ SQL values
  local function raises(pattern, fn)
    tried = tried + 1
    local ok, err = pcall(fn)
    assert.is_false(ok, "expected an error matching " .. pattern)
    assert.matches(pattern, tostring(err))
    refused = refused + 1
  end

  local function roundtrip(sql, value)
    tried = tried + 1
    local r = bmdb.transact(function(tx) return tx:one(sql, value) end)
    refused = refused + 1
    return r
  end

  it("stores an injection attempt through a parameter verbatim", function()
    local evil = "x'); DROP TABLE kept; --"
    roundtrip("INSERT INTO kept (k, v) VALUES ('evil', $1) RETURNING v", evil)
    assert.equal(evil, admin:one("SELECT v FROM kept WHERE k = 'evil'").v)
    assert.equal(4, admin:count("SELECT 1 FROM kept"))
    admin:exec("DELETE FROM kept WHERE k = 'evil'")
  end)

  it("refuses a missing parameter, naming it", function()
    raises("%$2", function() bmdb.transact(function(tx) tx:one("SELECT $1::TEXT, $2::TEXT", "a") end) end)
  end)

  it("refuses an extra argument", function()
    raises("argument", function() bmdb.transact(function(tx) tx:one("SELECT $1::TEXT", "a", "b") end) end)
  end)

  it("refuses a table as a parameter, naming it", function()
    raises("table", function() bmdb.transact(function(tx) tx:one("SELECT $1::TEXT", {}) end) end)
  end)

  it("refuses a function as a parameter, naming it", function()
    raises("function", function() bmdb.transact(function(tx) tx:one("SELECT $1::TEXT", print) end) end)
  end)

  it("stores a 10 MB string whole", function()
    local big = string.rep("0123456789", 1024 * 1024)
    local r = roundtrip("SELECT length($1::TEXT) AS n, md5($1::TEXT) AS h", big)
    assert.equal(#big, r.n)
  end)

  it("refuses a NUL byte in text, naming the parameter", function()
    raises("NUL", function() bmdb.transact(function(tx) tx:one("SELECT $1::TEXT AS v", "ab\0cd") end) end)
  end)

  it("keeps a NUL byte in bytea", function()
    assert.equal("a\0b", roundtrip("SELECT $1::BYTEA AS v", "a\0b").v)
  end)

  it("refuses invalid UTF-8 with the server's error", function()
    raises("22021", function() bmdb.transact(function(tx) tx:one("SELECT $1::TEXT AS v", "\255\254") end) end)
  end)

  it("returns an int8 beyond 2^53 exactly, as a string", function()
    assert.equal("9007199254740993", roundtrip("SELECT $1::INT8 + 1 AS v", 2 ^ 53).v)
  end)

  for _, c in ipairs { { "NaN", 0 / 0 }, { "infinity", math.huge }, { "-infinity", -math.huge } } do
    it("keeps " .. c[1] .. " as a float8, and refuses it as an integer", function()
      local v = roundtrip("SELECT $1::FLOAT8 AS v", c[2]).v
      if c[2] ~= c[2] then assert.is_true(v ~= v) else assert.equal(c[2], v) end
      raises("", function() bmdb.transact(function(tx) tx:one("SELECT $1::INT8 AS v", c[2]) end) end)
    end)
  end

  -- ------------------------------------------------------------ ids and names
  it("refuses a machine id that is not a UUID", function()
    raises("UUID", function() bmdb.work("not-a-uuid", "Ok", function() end) end)
  end)

  it("refuses a machine id that does not exist", function()
    raises("", function() bmdb.work("00000000-0000-0000-0000-000000000000", "Ok", function() end) end)
  end)

  for _, name in ipairs { "1abc", "bad name", string.rep("a", 64), "" } do
    it("refuses the process name " .. string.format("%q", name:sub(1, 12)), function()
      raises("process", function() bmdb.work(machine, name, function() end) end)
    end)
  end

  -- ------------------------------------------------------------ migrations, data dir
  it("refuses to start when an applied migration has changed", function()
    local other, oadmin = F.database()
    oadmin:exec("UPDATE schema_migrations SET checksum = 'changed' WHERE version = (SELECT min(version) FROM schema_migrations)")
    refused_with(nil, "0001", host({ file("valid.lua", valid) }, { dsn = other }))
    oadmin:close()
  end)

  it("refuses a data dir it cannot create", function()
    refused_with(nil, "/proc/bmdb%-data", host({ "--data-dir", "/proc/bmdb-data", file("valid.lua", valid) }, { dsn = false }))
  end)

  it("refuses a data dir that is a file", function()
    local f = file("not-a-dir", "x")
    refused_with(nil, "not%-a%-dir", host({ "--data-dir", f, file("valid.lua", valid) }, { dsn = false }))
  end)

  -- ------------------------------------------------------------ nothing lost
  it("lost nothing committed before", function()
    assert.equal(3, admin:count("SELECT 1 FROM kept"))
    assert.equal(3, admin:count("SELECT 1 FROM machines"))
    assert.is_true(admin:count("SELECT 1 FROM schema_migrations") >= 4)
  end)
end)
