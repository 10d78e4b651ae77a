-- Hot reload: --watch, SIGHUP, broken edits, editor save patterns.
local H = require "support.helpers"
local core = require "bmdb.core"

local template = [[
local bmdb = require "bmdb"
local VERSION = "%s"
%s
return {
  bmdb.worker {
    process = "Edit", poll = 0.1, concurrency = tonumber(os.getenv("SLOTS") or "1"),
    select = function(tx, limit)
      return tx:query([=[SELECT w.machine_id FROM wanted w
        WHERE w.process = 'Edit' AND NOT EXISTS (SELECT 1 FROM ran r WHERE r.machine_id = w.machine_id)
          AND NOT EXISTS (SELECT 1 FROM work_blocked b WHERE b.machine_id = w.machine_id AND b.process = 'Edit')
        LIMIT $1]=], limit)
    end,
    run = function(w)
      io.stdout:write("running ", w.machine, " ", VERSION, "\n"); io.stdout:flush()
      local gate = os.getenv("GATE")
      if gate then while not io.open(gate) do bmdb.sleep(0.02) end end
      w:finish(function(tx) tx:exec("INSERT INTO ran VALUES ($1, $2, $3)", w.machine, VERSION, w.session_id) end)
    end,
  },
  %s
}
]]

local extra_worker = [[
  bmdb.worker {
    process = "Extra", poll = 0.1,
    select = function(tx, limit)
      return tx:query([=[SELECT w.machine_id FROM wanted w
        WHERE w.process = 'Extra' AND NOT EXISTS (SELECT 1 FROM ran r WHERE r.machine_id = w.machine_id)
        LIMIT $1]=], limit)
    end,
    run = function(w)
      w:finish(function(tx) tx:exec("INSERT INTO ran VALUES ($1, 'extra', $2)", w.machine, w.session_id) end)
    end,
  },
]]

-- prelude: code the top level runs before it returns the workers
local function script(version, extra, prelude)
  return string.format(template, version, prelude or "", extra or "")
end

local function rename_over(path, content)
  H.write_file(path .. ".swp", content)
  assert(os.rename(path .. ".swp", path))
end

local function multi_write(path, content)
  local third = math.floor(#content / 3)
  local parts = { content:sub(1, third), content:sub(third + 1, 2 * third), content:sub(2 * third + 1) }
  for i, part in ipairs(parts) do
    local f = assert(io.open(path, i == 1 and "wb" or "ab"))
    f:write(part)
    f:close()
  end
end

local function count(haystack, needle)
  return select(2, haystack:gsub(needle:gsub("%p", "%%%0"), ""))
end

describe("hot reload", function()
  local dsn, admin, dir, path, host

  local function want(process)
    local m = admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
    admin:exec("INSERT INTO wanted VALUES ($1, $2)", m, process or "Edit")
    admin:exec("SELECT pg_notify('bmdb_wake', '')")
    return m
  end

  local function ran(m)
    return H.wait_until(function() return admin:one("SELECT version, session_id FROM ran WHERE machine_id = $1", m) end,
      20, "machine " .. m .. " to be worked")
  end

  local function start(args, env)
    local argv = { H.bin, "--grace", "5" }
    for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
    argv[#argv + 1] = path
    local e = { BMDB_DSN = dsn }
    for k, v in pairs(env or {}) do e[k] = v end
    host = H.spawn { argv = argv, env = e }
    host:await("stderr", "workers started")
    return host
  end

  local function wait_generation(n)
    host:await("stderr", "msg=reloaded generation=" .. n .. " ")
  end

  before_each(function()
    dsn = H.postgres():create_db()
    assert.equal(0, (H.run({ H.bin, "migrate" }, { env = { BMDB_DSN = dsn } })))
    admin = core.connect(dsn)
    admin:exec("CREATE TABLE wanted (machine_id UUID PRIMARY KEY, process TEXT NOT NULL)")
    admin:exec("CREATE TABLE ran (machine_id UUID PRIMARY KEY, version TEXT NOT NULL, session_id UUID NOT NULL)")
    dir = H.tmpdir("reload")
    path = dir .. "/edit.lua"
    H.write_file(path, script("v1"))
  end)

  after_each(function()
    if host and host:running() then
      host:kill("TERM")
      host:wait(30)
    end
    admin:close()
  end)

  it("finishes the item in flight on the old code and runs the next on the new", function()
    local gate = dir .. "/gate"
    start({ "--watch" }, { GATE = gate })
    local m1 = want()
    host:await("stdout", "running " .. m1 .. " v1")
    rename_over(path, script("v2"))
    wait_generation(2)
    assert.matches("took=[%d.]+ms", host:stderr())
    H.write_file(gate, "")
    assert.equal("v1", ran(m1).version)
    local m2 = want()
    assert.equal("v2", ran(m2).version)
    -- the session and the item's lock survived the reload
    assert.equal(ran(m1).session_id, ran(m2).session_id)
    assert.equal(0, admin:one("SELECT count(*) AS n FROM work_history WHERE event IN ('Canceled', 'Abandoned')").n)
  end)

  it("keeps the old code on a broken edit and logs file:line", function()
    start { "--watch" }
    rename_over(path, "local bmdb = require 'bmdb'\nreturn {\n  bmdb.worker { process = = 1 }\n}\n")
    host:await("stderr", "reload refused")
    assert.matches('reload refused; the old code keeps running" error="' .. path .. ':3:', host:stderr(), 1, true)
    rename_over(path, "local bmdb = require 'bmdb'\nerror('not today')\n")
    H.wait_until(function() return count(host:stderr(), "reload refused") == 2 end, 20, "the second refusal")
    assert.matches(path .. ":2: not today", host:stderr(), 1, true)
    rename_over(path, "local bmdb = require 'bmdb'\nreturn { bmdb.worker { process = 'Edit', concurrency = 0 } }\n")
    H.wait_until(function() return count(host:stderr(), "reload refused") == 3 end, 20, "the third refusal")
    assert.matches("concurrency must be a whole number", host:stderr(), 1, true)
    assert.equal("v1", ran(want()).version)
    assert.equal(0, count(host:stderr(), "msg=reloaded"))
  end)

  it("reloads once per save, for a rename-over save and for several writes in a row", function()
    start { "--watch" }
    rename_over(path, script("v2"))
    wait_generation(2)
    multi_write(path, script("v3"))
    wait_generation(3)
    -- SIGHUP always reloads: generation 4 proves nothing else came in between
    host:kill("HUP")
    wait_generation(4)
    assert.equal(3, count(host:stderr(), "msg=reloaded"))
    assert.equal(0, count(host:stderr(), "reload refused"))
    assert.equal("v3", ran(want()).version)
  end)

  it("runs in every slot the bytes it validated, even when the file changes right after", function()
    local gate, tampered = dir .. "/gate", dir .. "/tampered"
    start({}, { GATE = gate, SLOTS = "2" })
    -- v2's top level, run to validate v2, saves v3 over the script at
    -- once: a valid script, but never validated, so no slot may run it
    local tamper = string.format([[
if not io.open(%q) then
  io.open(%q, "w"):close()
  local f = io.open(arg[0], "wb"); f:write(%q); f:close()
end]], tampered, tampered, script("v3"))
    H.write_file(path, script("v2", nil, tamper))
    host:kill("HUP")
    wait_generation(2)
    assert.equal(script("v3"), H.read_file(path)) -- the save did happen
    -- both slots hold an item at once: each reports the code it runs
    local m1, m2 = want(), want()
    host:await("stdout", "running " .. m1)
    host:await("stdout", "running " .. m2)
    assert.matches("running " .. m1 .. " v2\n", host:stdout(), 1, true)
    assert.matches("running " .. m2 .. " v2\n", host:stdout(), 1, true)
    H.write_file(gate, "")
    assert.equal("v2", ran(m1).version)
    assert.equal("v2", ran(m2).version)
    assert.not_matches("v3", host:stdout(), 1, true)
  end)

  it("serves modules from the validated snapshot too, with file:line in their errors", function()
    local helper, tampered = dir .. "/helper.lua", dir .. "/tampered"
    H.write_file(helper, "return { version = 'h1' }\n")
    H.write_file(path, script("v1", nil, 'VERSION = require("helper").version'))
    start()
    assert.equal("h1", ran(want()).version)
    -- v2 requires helper h2, then saves h3 over it: never validated
    H.write_file(helper, "return { version = 'h2' }\n")
    H.write_file(path, script("v2", nil, string.format([[
VERSION = require("helper").version
if not io.open(%q) then
  io.open(%q, "w"):close()
  local f = io.open(%q, "wb"); f:write("return { version = 'h3' }\n"); f:close()
end]], tampered, tampered, helper)))
    host:kill("HUP")
    wait_generation(2)
    assert.equal("return { version = 'h3' }\n", H.read_file(helper))
    assert.equal("h2", ran(want()).version)
    H.write_file(helper, "local x = 1\nerror('broken helper')\n")
    host:kill("HUP")
    host:await("stderr", "reload refused")
    assert.matches(helper .. ":2: broken helper", host:stderr(), 1, true)
  end)

  it("with --watch, follows the modules the script requires from its directory", function()
    local helper = dir .. "/helper.lua"
    H.write_file(helper, "return { version = 'h1' }\n")
    H.write_file(path, script("v1", nil, 'VERSION = require("helper").version'))
    start { "--watch" }
    assert.equal("h1", ran(want()).version)
    rename_over(helper, "return { version = 'h2' }\n")
    wait_generation(2)
    assert.equal("h2", ran(want()).version)
  end)

  it("a slot that cannot load the validated code keeps its old code and retries", function()
    start()
    local validated, allow = dir .. "/validated", dir .. "/allow"
    -- v2 loads where it is validated, then fails in the slot until allowed
    local flaky = string.format([[
if io.open(%q) then
  if not io.open(%q) then error("flaky start in this slot") end
else
  io.open(%q, "w"):close()
end]], validated, allow, validated)
    H.write_file(path, script("v2", nil, flaky))
    host:kill("HUP")
    wait_generation(2)
    host:await("stderr", "slot cannot load the new code; it keeps its old code and retries")
    assert.matches("flaky start in this slot", host:stderr(), 1, true)
    assert.equal("v1", ran(want()).version)
    H.write_file(allow, "")
    host:await("stderr", "slot loaded the code after failing")
    assert.equal("v2", ran(want()).version)
  end)

  it("serves more than 64 workers, and reloads them", function()
    local workers = {}
    for i = 1, 70 do
      workers[#workers + 1] = string.format([[
  bmdb.worker {
    process = "P%d", poll = 1,
    select = function(tx, limit)
      return tx:query("SELECT machine_id FROM wanted w WHERE process = 'P%d' AND NOT EXISTS (SELECT 1 FROM ran r WHERE r.machine_id = w.machine_id) LIMIT $1", limit)
    end,
    run = function(w)
      w:finish(function(tx) tx:exec("INSERT INTO ran VALUES ($1, $2, $3)", w.machine, VERSION, w.session_id) end)
    end,
  },]], i, i)
    end
    local many = "local bmdb = require 'bmdb'\nlocal VERSION = '%s'\nreturn {\n" .. table.concat(workers, "\n") .. "\n}\n"
    H.write_file(path, string.format(many, "v1"))
    local code, out = H.run({ H.bin, "check", path }, { env = { BMDB_DSN = "host=/nonexistent dbname=none" } })
    assert.equal(0, code)
    assert.matches(", P64 x1, P65 x1,", out, 1, true)
    -- (and the host's own retention loop, which every worker script runs)
    assert.matches(", P70 x1, loop bmdb:retention\n", out, 1, true)
    start()
    assert.matches("workers started\" slots=70", host:stderr(), 1, true)
    assert.equal("v1", ran(want("P70")).version)
    H.write_file(path, string.format(many, "v2"))
    host:kill("HUP")
    wait_generation(2)
    assert.equal("v2", ran(want("P70")).version)
  end)

  it("reloads on SIGHUP without --watch, and takes added workers into service", function()
    start()
    H.write_file(path, script("v2", extra_worker))
    host:kill("HUP")
    wait_generation(2)
    assert.matches("workers=\"Edit x1, Extra x1, loop bmdb:retention\"", host:stderr(), 1, true)
    assert.equal("v2", ran(want()).version)
    assert.equal("extra", ran(want("Extra")).version)
    -- and a removed worker's slot ends
    H.write_file(path, script("v3"))
    host:kill("HUP")
    wait_generation(3)
    local m = want("Extra")
    assert.equal("v3", ran(want()).version)
    assert.is_nil(admin:one("SELECT version FROM ran WHERE machine_id = $1", m))
  end)
end)

describe("bmdb-host check", function()
  local dir

  setup(function() dir = H.tmpdir("check") end)

  local function check(src)
    H.write_file(dir .. "/s.lua", src)
    -- no database anywhere: check must not need one
    return H.run({ H.bin, "check", dir .. "/s.lua" }, { env = { BMDB_DSN = "host=/nonexistent dbname=none" } })
  end

  it("accepts valid worker definitions and names them", function()
    local code, out = check(script("v1", extra_worker))
    assert.equal(0, code)
    assert.matches("ok, Edit x1, Extra x1", out, 1, true)
  end)

  it("exits 2 listing every problem of a definition", function()
    local code, _, err = check("local bmdb = require 'bmdb'\nreturn { bmdb.worker { process = 'P', concurrency = -1, run = 5 } }\n")
    assert.equal(2, code)
    assert.matches("s.lua:2: worker P: concurrency must be a whole number from 1 to 256, got -1", err, 1, true)
    assert.matches("worker P: select must be a function(tx, limit), got nil", err, 1, true)
    assert.matches("worker P: run must be a function(w), got number", err, 1, true)
  end)

  it("exits 2 on an invalid definition and 1 on a runtime error, as a run would", function()
    local code, _, err = check("local bmdb = require 'bmdb'\nlocal w = bmdb.worker { process = 'P' }\nreturn { w }\n")
    assert.equal(2, code)
    assert.matches("s.lua:2: worker P: select must be a function(tx, limit), got nil", err, 1, true)
    code, _, err = check("local bmdb = require 'bmdb'\nlocal t = nil\nreturn { t.x }\n")
    assert.equal(1, code)
    assert.matches("s.lua:3: attempt to index local 't' (a nil value)", err, 1, true)
  end)

  it("tells a one-off that needs the database by the error's kind, not by its text", function()
    local code, out = check("require('bmdb').transact(function(tx) end)\n")
    assert.equal(0, code)
    assert.matches("compiles; a one-off that uses the database at load time", out, 1, true)
    -- a script's own error that merely says the same words is a runtime error
    local err
    code, _, err = check("error('bmdb: not connected to a database (no session)')\n")
    assert.equal(1, code)
    assert.matches("its top level fails at run time", err, 1, true)
  end)

  it("exits 2 on a syntax error with file:line, and on values that are not workers", function()
    local code, _, err = check("return {\n  x = = 1 }\n")
    assert.equal(2, code)
    assert.matches("s.lua:2:", err, 1, true)
    code, _, err = check("local bmdb = require 'bmdb'\nreturn { 42 }\n")
    assert.equal(2, code)
    assert.matches("returned value #1 is not a bmdb.worker{...} or bmdb.loop{...} definition", err, 1, true)
  end)
end)
