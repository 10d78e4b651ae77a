-- Connections against a cluster (docs/operations.md): the user's
-- connect_timeout wins over the host's default; a failed connect names
-- every server libpq tried, each with its own reason; a read-only standby's
-- refusal says what to put in the DSN; an outage is a few log lines, not
-- one per attempt.
local H = require "support.helpers"
local core = require "bmdb.core"
local ffi = require "ffi"

ffi.cdef [[
struct conn_spec_sockaddr_un { unsigned short sun_family; char sun_path[108]; };
int socket(int domain, int type, int protocol);
int bind(int fd, const void *addr, unsigned int len);
int listen(int fd, int backlog);
int close(int fd);
]]

-- A PostgreSQL socket in a directory of its own that takes connections
-- (the kernel queues them) and never answers: a server that hangs.
local function silent_server()
  local dir = H.tmpdir("silent")
  local fd = ffi.C.socket(1, 1, 0) -- AF_UNIX, SOCK_STREAM
  local a = ffi.new("struct conn_spec_sockaddr_un")
  a.sun_family = 1
  ffi.copy(a.sun_path, dir .. "/.s.PGSQL.5432")
  assert(fd >= 0 and ffi.C.bind(fd, a, ffi.sizeof(a)) == 0 and ffi.C.listen(fd, 64) == 0, "cannot listen")
  return dir, fd
end

-- How many lines of text s has with msg="..." starting with prefix.
local function lines(s, prefix)
  local n = 0
  for line in s:gmatch("[^\n]+") do
    if line:find('msg="' .. prefix, 1, true) then n = n + 1 end
  end
  return n
end

describe("connect_timeout", function()
  local dir, fd
  setup(function() dir, fd = silent_server() end)
  teardown(function() ffi.C.close(fd) end)

  -- The host's default is 10 s: the user's 1 s must end the attempt far
  -- sooner (the bound is slack against the default, not a benchmark).
  local function fails_soon(dsn, env)
    local t0 = H.now()
    local code, out, err = H.run({ H.bin, "--dsn", dsn, "status" }, { env = env, timeout = 30 })
    local took = H.now() - t0
    assert.equal(1, code, out .. err)
    assert.matches("timeout expired", err, 1, true)
    assert.is_true(took < 6, string.format("took %.1f s, the default is 10 s: %s", took, err))
  end

  it("of a keyword DSN wins over the host's default", function()
    fails_soon("host=" .. dir .. " port=5432 dbname=x user=u connect_timeout=1")
  end)

  it("of a URI wins over the host's default", function()
    fails_soon("postgresql://u@/x?host=" .. dir .. "&connect_timeout=1")
  end)

  it("of PGCONNECT_TIMEOUT wins over the host's default", function()
    fails_soon("host=" .. dir .. " port=5432 dbname=x user=u", { PGCONNECT_TIMEOUT = "1" })
  end)

  it("in core.connect too", function()
    local t0 = H.now()
    local ok, e = pcall(core.connect, "host=" .. dir .. " port=5432 dbname=x user=u connect_timeout=1")
    assert.is_false(ok)
    assert.matches("timeout expired", tostring(e), 1, true)
    assert.is_true(H.now() - t0 < 6, tostring(e))
  end)

  it("defaults to the host's when none is set (libpq alone would wait for ever)", function()
    local code, out, err = H.run({ H.bin, "--dsn", "host=" .. dir .. " port=5432 dbname=x user=u", "status" },
      { env = { PGCONNECT_TIMEOUT = false }, timeout = 40 })
    assert.equal(1, code, out .. err)
    assert.matches("timeout expired", err, 1, true)
  end)
end)

describe("a cluster in the DSN", function()
  local primary, standby, db

  setup(function()
    primary, standby = H.standby_pair()
    db = primary:create_db():match("dbname=(%S+)")
    H.wait_until(function()
      local ok, c = pcall(core.connect, standby:dsn(db))
      if ok then c:close() end
      return ok
    end, 30, "the new database on the standby")
  end)

  teardown(function() standby:stop() end)

  it("whose servers all fail: the error names each server with its own reason, never the password", function()
    local missing = H.tmpdir("nothing")
    local dsn = "host=" .. missing .. "," .. standby.dir .. " port=5432,5432 dbname=" .. db ..
      " user=bmdb password=S3cretPW target_session_attrs=read-write"
    local code, out, err = H.run({ H.bin, "--dsn", dsn, "status" })
    assert.equal(1, code, out .. err)
    assert.matches('on socket "' .. missing .. '/.s.PGSQL.5432" failed: No such file or directory', err, 1, true)
    assert.matches('on socket "' .. standby.dir .. '/.s.PGSQL.5432" failed: session is read-only', err, 1, true)
    local first = err:match("[^\n]*")
    assert.matches("session is read-only", first, 1, true) -- one line, every attempt
    assert.is_nil((out .. err):find("S3cret", 1, true))
    local ok, e = pcall(core.connect, dsn)
    assert.is_false(ok)
    assert.matches('failed: No such file or directory; connection to server on socket "' .. standby.dir,
      tostring(e), 1, true)
  end)

  local HINT = "list every server of the cluster in the DSN (host=a,b,c) and set target_session_attrs=read-write"

  it("that reaches a standby only: the host's refusal says to list every server and set target_session_attrs",
    function()
      local code, out, err = H.run({ H.bin, "--dsn", standby:dsn(db), "migrate" })
      assert.equal(1, code, out .. err)
      assert.matches("25006 cannot execute CREATE TABLE in a read-only transaction", err, 1, true)
      assert.matches(HINT, err, 1, true)
      local _, hints = err:gsub("target_session_attrs", "")
      assert.equal(1, hints, err)
      -- and a script's host, which starts with the schema
      local script = H.tmpdir("standby") .. "/w.lua"
      H.write_file(script, "return {}\n")
      code, out, err = H.run({ H.bin, "--dsn", standby:dsn(db), script })
      assert.equal(1, code, out .. err)
      assert.matches(HINT, err, 1, true)
    end)

  it("that reaches a standby only: the error of a statement carries the hint (25006, 0A000 hot standby)", function()
    local c = core.connect(standby:dsn(db))
    local ok, e = pcall(c.exec, c, "CREATE TABLE t (x INT8)")
    assert.is_false(ok)
    assert.equal("25006", e.sqlstate)
    assert.matches(HINT, e.hint, 1, true)
    assert.matches(HINT, tostring(e), 1, true)
    ok, e = pcall(c.exec, c, "BEGIN ISOLATION LEVEL SERIALIZABLE")
    if ok then ok, e = pcall(c.exec, c, "SELECT 1") end
    c:close()
    assert.is_false(ok)
    assert.equal("0A000", e.sqlstate)
    assert.matches("hot standby", e.message, 1, true)
    assert.matches(HINT, e.hint, 1, true) -- not the server's "use REPEATABLE READ"
    assert.matches(HINT, tostring(e), 1, true)
    -- a primary's 25006 (a READ ONLY transaction that writes) gets none
    c = core.connect(primary:dsn(db))
    c:exec("BEGIN READ ONLY")
    ok, e = pcall(c.exec, c, "CREATE TABLE t (x INT8)")
    c:close()
    assert.is_false(ok)
    assert.equal("25006", e.sqlstate)
    assert.is_nil(tostring(e):find("target_session_attrs", 1, true), tostring(e))
  end)
end)

describe("a database outage under a running host", function()
  it("is logged when it starts, at a bounded rate, and once with its length when it ends", function()
    local pg = H.postgres { fresh = true }
    local dsn = pg:create_db()
    local dir = H.tmpdir("outage")
    H.write_file(dir .. "/w.lua", [[
local bmdb = require "bmdb"
return { bmdb.worker { process = "Outage", concurrency = 3, poll = 0.1,
  select = function(tx, limit) return tx:query("SELECT gen_random_uuid() AS machine_id WHERE false LIMIT $1", limit) end,
  run = function(w) end } }
]])
    local h = H.spawn { argv = { H.bin, "--dsn", dsn, "--interval", "2", dir .. "/w.lua" } }
    h:await("stderr", "workers started", 30)
    pg:stop("fast")
    H.wait_until(function() return lines(h:stderr(), "session lost") >= 1 end, 30, "the session to be lost")
    -- the outage goes on (attempts every 0.2 s, claims every 0.1 s) until
    -- it has been told once more
    h:await("stderr", 'msg="database outage goes on"', 30)
    pg:start()
    h:await("stderr", 'msg="database reachable again after', 30)
    h:await("stderr", 'msg="session started"', 30)
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
    local err = h:stderr()
    assert.equal(1, lines(err, "database outage started"), err)
    local goes_on = lines(err, "database outage goes on")
    assert.is_true(goes_on >= 1 and goes_on <= 2, err) -- one per 10 s of it
    assert.matches('msg="database outage goes on" for="1%d%.%d s" failures=%d%d+', err) -- counted, not logged
    assert.equal(1, lines(err, "database reachable again after"), err)
    assert.matches('msg="database reachable again after %d+%.%d s" failures=%d+', err)
    -- no line per attempt: neither the heartbeat's nor the slots' claims
    assert.equal(0, lines(err, "heartbeat"), err)
    assert.equal(0, lines(err, "cannot start a new session"), err)
    assert.equal(0, lines(err, "claim failed"), err)
    pg:stop()
  end)

  it("of a server turned read-only (as a demoted primary) gives the standby hint once, not per statement",
    function()
      local pg = H.postgres { fresh = true }
      local dsn = pg:create_db()
      local dir = H.tmpdir("readonly")
      H.write_file(dir .. "/w.lua", [[
local bmdb = require "bmdb"
return { bmdb.worker { process = "ReadOnly", concurrency = 3, poll = 0.1,
  select = function(tx, limit) return tx:query("SELECT gen_random_uuid() AS machine_id WHERE false LIMIT $1", limit) end,
  run = function(w) end } }
]])
      local h = H.spawn { argv = { H.bin, "--dsn", dsn, "--interval", "2", dir .. "/w.lua" } }
      h:await("stderr", "workers started", 30)
      local admin = core.connect(dsn)
      admin:exec("SET default_transaction_read_only = off")
      admin:exec("ALTER SYSTEM SET default_transaction_read_only = on")
      admin:exec("SELECT pg_reload_conf()")
      h:await("stderr", 'msg="database outage started"', 30)
      h:await("stderr", 'msg="session lost"', 30) -- claims have failed meanwhile, several times each
      admin:exec("ALTER SYSTEM RESET default_transaction_read_only")
      admin:exec("SELECT pg_reload_conf()")
      admin:close()
      h:await("stderr", 'msg="database reachable again after', 30)
      h:kill("TERM")
      assert.equal(0, h:wait(30), h:stderr())
      local err = h:stderr()
      assert.equal(1, lines(err, "database outage started"), err)
      -- whoever failed first, the heartbeat or a claim
      assert.matches('msg="database outage started" during=%a+ error="[^"]*25006:? cannot execute [^"]* in a ' ..
        'read%-only transaction hint: the server is a read%-only standby', err)
      local _, hints = err:gsub("target_session_attrs", "")
      assert.equal(1, hints, err)
      assert.equal(0, lines(err, "claim failed"), err)
      pg:stop()
    end)
end)
