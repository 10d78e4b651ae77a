-- The embedded default database: no --dsn, no BMDB_DSN.
local H = require "support.helpers"

describe("the embedded database", function()
  local dir, data

  local function host(args, opts)
    local argv = { H.bin, "--data-dir", data }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    local o = { env = { BMDB_DSN = false }, timeout = 120 }
    for k, v in pairs(opts or {}) do o[k] = v end
    if o.spawn then return H.spawn { argv = argv, env = o.env } end
    return H.run(argv, o)
  end

  local function server_running()
    return H.read_file(data .. "/pgdata/postmaster.pid") ~= nil
  end

  -- Each test has a data dir of its own: none relies on a cluster an
  -- earlier one created.
  before_each(function()
    dir = H.tmpdir("embedded")
    data = dir .. "/data"
    H.write_file(dir .. "/add.lua", [[
      local bmdb = require "bmdb"
      local n = bmdb.transact(function(tx)
        for _ = 1, tonumber(arg[1]) do tx:exec("INSERT INTO machines DEFAULT VALUES") end
        return tx:one("SELECT count(*) AS n FROM machines").n
      end)
      print("machines " .. n)
    ]])
  end)

  it("is created on first use, keeps its data across runs, and stops when the host exits", function()
    local code, out, err = host { dir .. "/add.lua", "2" }
    assert.equal(0, code, err)
    assert.matches("machines 2", out)
    assert.is_false(server_running())
    code, out, err = host { dir .. "/add.lua", "1" }
    assert.equal(0, code, err)
    assert.matches("machines 3", out)
    assert.is_false(server_running())
  end)

  it("listens on a Unix socket only", function()
    local code, _, err = host { dir .. "/add.lua", "1" }
    assert.equal(0, code, err)
    local conf = H.read_file(data .. "/pgdata/postgresql.conf")
    assert.matches("listen_addresses = ''", conf, 1, true)
  end)

  it("is shared by a second host, and stopped only by the last one out", function()
    H.write_file(dir .. "/wait.lua", [[
      local bmdb = require "bmdb"
      print("ready"); io.stdout:flush()
      while not io.open(arg[1]) do bmdb.sleep(0.05) end
      print("machines " .. bmdb.transact(function(tx) return tx:one("SELECT count(*) AS n FROM machines").n end))
    ]])
    local go = dir .. "/go"
    local first = host({ dir .. "/wait.lua", go }, { spawn = true })
    H.wait_until(function() return first:stdout():match("ready") end, 60, "the first host")
    local pid = H.read_file(data .. "/pgdata/postmaster.pid"):match("^(%d+)")
    local code, out, err = host { dir .. "/add.lua", "1" }
    assert.equal(0, code, err)
    assert.matches("machines 1", out)
    -- the second host neither started another server nor stopped this one
    assert.equal(pid, H.read_file(data .. "/pgdata/postmaster.pid"):match("^(%d+)"))
    H.write_file(go, "")
    assert.equal(0, first:wait(60), first:stderr())
    assert.matches("machines 1", first:stdout())
    assert.is_false(server_running())
  end)
end)
