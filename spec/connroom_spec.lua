-- A host whose pool can outgrow the server's free connections: warned of
-- at start with the numbers, and the server's refusals (53300, too many
-- clients) said plainly rather than retried in silence. On a server of
-- its own whose max_connections is small.
local H = require "support.helpers"
local core = require "bmdb.core"

describe("the server's room for connections", function()
  local dsn, dir

  setup(function()
    local pg = H.postgres { fresh = true }
    pg:psql(pg:dsn(), "ALTER SYSTEM SET max_connections = 20")
    pg:psql(pg:dsn(), "ALTER SYSTEM SET superuser_reserved_connections = 3")
    pg:restart()
    dsn = pg:create_db()
    local code, _, err = H.run({ H.bin, "migrate" }, { env = { BMDB_DSN = dsn } })
    assert.equal(0, code, err)
    local c = core.connect(dsn)
    c:exec("INSERT INTO machines (machine_id) SELECT gen_random_uuid() FROM generate_series(1, 400)")
    c:close()
    dir = H.tmpdir("connroom")
  end)

  -- n slots whose bodies each hold a connection for a while.
  local function host(n)
    local script = dir .. "/room" .. n .. ".lua"
    H.write_file(script, [[
      local bmdb = require "bmdb"
      return { bmdb.worker {
        process = "Room]] .. n .. [[", poll = 0.2, concurrency = ]] .. n .. [[,
        select = function(tx, limit)
          return tx:query([=[SELECT machine_id FROM machines m WHERE NOT EXISTS (SELECT 1 FROM work_blocked b
            WHERE b.machine_id = m.machine_id AND b.process = 'Room]] .. n .. [[') LIMIT $1]=], limit)
        end,
        run = function(w)
          bmdb.transact(function(tx) tx:query("SELECT pg_sleep(0.5)") end)
          w:finish()
        end,
      } }
    ]])
    local h = H.spawn { argv = { H.bin, "--interval", "2", script }, env = { BMDB_DSN = dsn } }
    finally(function() h:kill("KILL") end) -- a failed spec leaves no host holding connections
    return h
  end

  local function count(text, plain)
    local n, at = 0, 1
    while true do
      local s, e = text:find(plain, at, true)
      if not s then return n end
      n, at = n + 1, e + 1
    end
  end

  it("warns once at start, naming the numbers, and says once that the server refuses connections", function()
    local h = host(20)
    h:await("stderr", "workers started")
    local warn = h:stderr():match('[^\n]*the server may run out of connections[^\n]*')
    assert.truthy(warn, h:stderr())
    -- the pool: 20 slots + 1 loop (retention) + 4
    for _, kv in ipairs { "slots=20", "pool=25", "max_connections=20", "reserved=3", "in_use=" } do
      assert.matches(kv, warn, 1, true)
    end
    assert.matches("superuser_reserved_connections", warn, 1, true)
    -- The slots then meet the limit; the refusal is said, once.
    h:await("stderr", "the server refused a connection: it has no room left (SQLSTATE 53300)", 30)
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
    local err = h:stderr()
    assert.equal(1, count(err, "the server may run out of connections"))
    assert.equal(1, count(err, "the server refused a connection"))
    assert.matches("too many clients already", err, 1, true)
  end)

  it("says nothing when the pool leaves room", function()
    local h = host(2)
    h:await("stderr", "work finished")
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
    assert.is_nil(h:stderr():find("run out of connections", 1, true), h:stderr())
    assert.is_nil(h:stderr():find("refused a connection", 1, true), h:stderr())
  end)
end)
