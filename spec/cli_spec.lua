-- The binary: one-off scripts, exit codes, signals, bad input.
local H = require "support.helpers"
local core = require "bmdb.core"

describe("bmdb-host", function()
  local dsn, admin, dir

  local function script(name, src)
    local path = dir .. "/" .. name
    H.write_file(path, src)
    return path
  end

  local function host(args, opts)
    local argv = { H.bin }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    opts = opts or {}
    opts.env = opts.env or { BMDB_DSN = dsn }
    return H.run(argv, opts)
  end

  setup(function()
    dsn = H.postgres():create_db()
    assert.equal(0, (H.run({ H.bin, "migrate" }, { env = { BMDB_DSN = dsn } })))
    admin = core.connect(dsn)
    dir = H.tmpdir("cli")
  end)

  teardown(function() admin:close() end)

  describe("one-off scripts", function()
    it("run once with a live session, get their arguments, and exit 0", function()
      local s = script("seed.lua", [[
        local bmdb = require "bmdb"
        local n = tonumber(arg[1])
        assert(select("#", ...) == 2 and select(2, ...) == "extra", "varargs reach the chunk")
        bmdb.transact(function(tx)
          for _ = 1, n do tx:exec("INSERT INTO machines DEFAULT VALUES") end
        end)
        print("session " .. bmdb.session().id .. " alive " .. tostring(bmdb.session().alive))
      ]])
      local before = admin:one("SELECT count(*) AS n FROM machines").n
      local code, out, err = host { s, "3", "extra" }
      assert.equal(0, code, err)
      assert.matches("alive true", out)
      assert.equal(before + 3, admin:one("SELECT count(*) AS n FROM machines").n)
      -- the session row is gone after a clean exit
      local id = out:match("session (%S+)")
      assert.equal(0, admin:one("SELECT count(*) AS n FROM sessions WHERE session_id = $1", id).n)
    end)

    it("exit non-zero with the Lua error and a traceback on failure", function()
      local s = script("boom.lua", "local function f() error('it broke') end\nf()\n")
      local code, _, err = host { s }
      assert.equal(1, code)
      assert.matches("boom.lua:1: it broke", err, 1, true)
      assert.matches("stack traceback", err, 1, true)
    end)

    it("report SQL errors with sqlstate and message", function()
      local s = script("sql.lua", [[require("bmdb").transact(function(tx) tx:exec("SELECT * FROM no_such_table") end)]])
      local code, _, err = host { s }
      assert.equal(1, code)
      assert.matches("SQL error 42P01: relation \"no_such_table\" does not exist", err, 1, true)
    end)

    it("report cancellation as kind canceled, spelled one way", function()
      local s = script("exit.lua", [[local ok, e = pcall(os.exit, 3)
        io.stdout:write(tostring(ok), " ", e.kind, " ", tostring(e), "\n")]])
      local code, out, err = host { s }
      assert.equal(3, code, err)
      assert.matches("false canceled canceled: os.exit ends the host", out, 1, true)
    end)

    it("report a wrong parameter count and an unsupported parameter type, naming them", function()
      local s = script("params.lua", [[require("bmdb").transact(function(tx) tx:one("SELECT $1::INT8 + $2::INT8 AS x", 1) end)]])
      local code, _, err = host { s }
      assert.equal(1, code)
      assert.matches("params.lua:1: bad argument #3 to 'one' (parameter $2 is missing", err, 1, true)
      s = script("ptype.lua", [[require("bmdb").transact(function(tx) tx:exec("SELECT $1::TEXT", print) end)]])
      code, _, err = host { s }
      assert.equal(1, code)
      assert.matches("ptype.lua:1: bad argument #2 to 'exec' (parameter $1: unsupported type function", err, 1, true)
    end)

    it("report an invalid process name and a machine id that is not a UUID", function()
      local s = script("proc.lua", [[require("bmdb").work("7b0c8f0e-1d4e-4f6a-9a53-0c4fa2f5e1b2", "no spaces", function() end)]])
      local code, _, err = host { s }
      assert.equal(1, code)
      assert.matches('proc.lua:1: bad argument #2 to \'work\' (invalid process name "no spaces"', err, 1, true)
      s = script("uuid.lua", [[require("bmdb").work("machine-7", "Provision", function() end)]])
      code, _, err = host { s }
      assert.equal(1, code)
      assert.matches("uuid.lua:1: bad argument #1 to 'work' (machine id is not a UUID: machine-7)", err, 1, true)
    end)
  end)

  describe("status and history", function()
    it("show sessions and work in flight, and one machine's audit trail", function()
      local m = admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
      local s = script("hold2.lua", [[
        local bmdb = require "bmdb"
        bmdb.work(arg[1], "Inspect", function(w)
          io.stdout:write("holding\n"); io.stdout:flush()
          while not io.open(arg[2]) do bmdb.sleep(0.02) end
        end)
      ]])
      local p = H.spawn { argv = { H.bin, "--component", "inspector", s, m, dir .. "/release" }, env = { BMDB_DSN = dsn } }
      H.wait_until(function() return p:stdout():match("holding") end, 20, "the lock")
      local code, out, err = host { "status" }
      assert.equal(0, code, err)
      assert.matches("sessions %(%d+%)", out)
      assert.matches("inspector%s+%S+:%d+%s+live", out)
      assert.matches(m .. "  Inspect", out, 1, true)
      H.write_file(dir .. "/release", "")
      assert.equal(0, p:wait(20), p:stderr())
      code, out = host { "history", m }
      assert.equal(0, code)
      assert.matches("Inspect%s+Started.*Inspect%s+Finished", out)
    end)

    it("history refuses a machine id that is not a UUID, before touching any database", function()
      local code, _, err = host({ "history", "rack-7" }, { env = { BMDB_DSN = "host=/nonexistent dbname=x" } })
      assert.equal(2, code)
      assert.matches("history: machine id is not a UUID: rack-7", err, 1, true)
    end)
  end)

  describe("bad input", function()
    it("an unknown flag prints usage and exits 2", function()
      local code, _, err = host { "--frobnicate", "x.lua" }
      assert.equal(2, code)
      assert.matches("unknown option '--frobnicate'", err, 1, true)
      assert.matches("usage: bmdb-host", err, 1, true)
    end)

    it("invalid worker definitions stop the host with exit 2 before any work", function()
      local s = script("badworkers.lua", "local bmdb = require 'bmdb'\nreturn { bmdb.worker { process = 'Ok', select = function() end, run = function() end }, 42 }\n")
      local code, _, err = host { s }
      assert.equal(2, code)
      assert.matches("returned value #2 is not a bmdb.worker{...} or bmdb.loop{...} definition", err, 1, true)
      s = script("badworker.lua", "local bmdb = require 'bmdb'\nreturn { bmdb.worker { process = 'Ok', poll = 0 } }\n")
      code, _, err = host { s }
      assert.equal(2, code)
      assert.matches("badworker.lua:2: worker Ok: select must be a function(tx, limit), got nil", err, 1, true)
      assert.matches("poll must be a number of seconds above 0, got 0", err, 1, true)
    end)

    it("a bad flag value names the flag", function()
      local code, _, err = host { "--interval", "soon", "x.lua" }
      assert.equal(2, code)
      assert.matches("--interval: expected a whole number from 1 to 3600, got 'soon'", err, 1, true)
    end)

    it("a missing script is named", function()
      local code, _, err = host { dir .. "/absent.lua" }
      assert.equal(2, code)
      assert.matches("cannot read script " .. dir .. "/absent.lua: No such file or directory", err, 1, true)
    end)

    it("a syntax error gives file:line and touches no database", function()
      local s = script("syntax.lua", "local x = 1\nlocal y = = 2\n")
      local code, _, err = host({ s }, { env = { BMDB_DSN = "host=/nonexistent dbname=x" } })
      assert.equal(2, code)
      assert.matches("syntax.lua:2:", err, 1, true)
      assert.not_matches("connect", err)
    end)

    it("an unreachable database names the server and the error, never the password", function()
      local s = script("ok.lua", "return\n")
      local code, _, err = host({ s }, { env = { BMDB_DSN = "host=" .. dir .. "/nosock port=5999 dbname=fleet user=ops password=hunter2" } })
      assert.equal(1, code)
      assert.matches("cannot connect to database (host=" .. dir .. "/nosock port=5999 dbname=fleet user=ops)", err, 1, true)
      assert.matches("No such file or directory", err, 1, true)
      assert.not_matches("hunter2", err)
      code, _, err = host({ "--dsn", "postgresql://ops:hunter2@" .. "localhost:1/fleet", s }, { env = { BMDB_DSN = false } })
      assert.equal(1, code)
      assert.matches("cannot connect to database (host=localhost port=1 dbname=fleet user=ops)", err, 1, true)
      assert.not_matches("hunter2", err)
    end)

    it("a malformed DSN is reported as such", function()
      local s = script("ok2.lua", "return\n")
      local code, _, err = host({ s }, { env = { BMDB_DSN = "host=/tmp dbname" } })
      assert.equal(1, code)
      assert.matches("cannot connect to database", err, 1, true)
      assert.matches("dbname", err, 1, true)
    end)
  end)

  describe("signals", function()
    it("SIGTERM ends the script, records held locks as Canceled, deletes the session, exits 0", function()
      local m = admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
      local s = script("hold.lua", [[
        local bmdb = require "bmdb"
        bmdb.work(arg[1], "Reboot", function(w)
          io.stdout:write("holding ", w.session_id, "\n"); io.stdout:flush()
          while true do bmdb.sleep(0.05) end
        end)
      ]])
      local p = H.spawn { argv = { H.bin, s, m }, env = { BMDB_DSN = dsn } }
      local session = H.wait_until(function() return p:stdout():match("holding (%S+)") end, 20, "the lock")
      assert.equal(1, admin:one("SELECT count(*) AS n FROM work WHERE machine_id = $1", m).n)
      p:kill("TERM")
      assert.equal(0, p:wait(20), p:stderr())
      assert.equal(0, admin:one("SELECT count(*) AS n FROM work WHERE machine_id = $1", m).n)
      assert.equal(0, admin:one("SELECT count(*) AS n FROM sessions WHERE session_id = $1", session).n)
      local h = admin:query("SELECT event, cause FROM work_history WHERE machine_id = $1 ORDER BY occurred_at", m)
      assert.same({ "Started", "Canceled" }, { h[1].event, h[2].event })
    end)

    it("SIGINT stops a body busy in pure Lua", function()
      local s = script("spin.lua", [[
        io.stdout:write("spinning\n"); io.stdout:flush()
        local x = 0
        while true do x = (x + os.clock()) % 7 end
      ]])
      local p = H.spawn { argv = { H.bin, s }, env = { BMDB_DSN = dsn } }
      H.wait_until(function() return p:stdout():match("spinning") end, 20, "the script to start")
      p:kill("INT")
      assert.equal(0, p:wait(20), p:stderr())
    end)
  end)
end)
