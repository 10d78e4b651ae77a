-- What a claim says of candidates it cannot use: a select row that is no
-- machine id is shown with its value and type, and candidates that name
-- no machine end the claim with a reason, not only "too many failed".
local H = require "support.helpers"

describe("a claim's bad candidates", function()
  local dsn, admin, dir

  setup(function()
    dsn, admin = H.open_core("candidates_spec")
    dir = H.tmpdir("candidates")
    admin:exec("CREATE TABLE ghosts (machine_id UUID PRIMARY KEY)")
    admin:exec("INSERT INTO ghosts SELECT gen_random_uuid() FROM generate_series(1, 200)")
  end)

  teardown(function() H.close_core(admin) end)

  local function host(select_body)
    H.write_file(dir .. "/w.lua", [[
      local bmdb = require "bmdb"
      return { bmdb.worker {
        process = "Bad", poll = 0.2, batch = 4,
        select = function(tx, limit) ]] .. select_body .. [[ end,
        run = function(w) w:finish() end,
      } }
    ]])
    local h = H.spawn { argv = { H.bin, "--interval", "2", dir .. "/w.lua" }, env = { BMDB_DSN = dsn } }
    finally(function() h:kill("KILL") end)
    return h
  end

  it("shows a candidate that is no machine id with its value and type", function()
    local h = host([[return { { machine_id = true }, { machine_id = 42 }, { name = "x" } }]])
    h:await("stderr", 'candidate="machine_id = true (a boolean, not a machine id)" reason="not a machine id (a UUID)"')
    h:await("stderr", 'candidate="machine_id = 42 (a number, not a machine id)"')
    h:await("stderr", 'candidate="{name=\\"x\\"} (a row with no machine_id field)"')
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
    assert.is_nil(h:stderr():find("error object", 1, true), h:stderr())
  end)

  it("says the candidates named no machine when too many failed to lock, naming the first", function()
    local h = host([[return tx:query("SELECT machine_id FROM ghosts ORDER BY machine_id LIMIT 100")]])
    h:await("stderr", "too many candidates failed to lock: 5 named no machine (machines has no row with that id), the first ")
    local first = h:stderr():match("too many candidates failed to lock: 5 named no machine %(machines has no row with that id%), the first (%x+%-[%x%-]+)")
    assert.truthy(first, h:stderr())
    assert.equal(1, admin:one("SELECT count(*) AS n FROM ghosts WHERE machine_id = $1", first).n)
    -- a later claim meets a candidate already known to fail, and skips it, saying why
    h:await("stderr", 'reason="no such machine (machines has no row with this id)"')
    h:kill("TERM")
    h:wait(30)
  end)
end)
