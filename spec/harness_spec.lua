-- The harness itself: if these fail, no other spec can be trusted.
local H = require "support.helpers"

describe("spec harness", function()
  it("wait_until returns the value, or times out naming what it waited for", function()
    local n = 0
    assert.equal(3, H.wait_until(function() n = n + 1; return n >= 3 and n end, 5, "n"))
    local ok, err = pcall(H.wait_until, function() return false end, 0.1, "the impossible")
    assert.is_false(ok)
    assert.matches("timed out after 0.1s waiting for the impossible", err, 1, true)
  end)

  it("spawn captures stdout, stderr and the exit code, and passes env", function()
    local code, out, err = H.run({ "/bin/sh", "-c", "echo out $FOO; echo err >&2; exit 3" }, { env = { FOO = "bar" } })
    assert.equal(3, code)
    assert.equal("out bar\n", out)
    assert.equal("err\n", err)
  end)

  it("reports death by signal as 128 + signal", function()
    local p = H.spawn { argv = { "/bin/sleep", "30" } }
    assert.is_true(p:running())
    p:kill("TERM")
    assert.equal(128 + 15, p:wait(10))
  end)

  it("starts PostgreSQL, makes separate databases, and keeps data over a restart", function()
    local pg = H.postgres()
    local a, b = pg:create_db(), pg:create_db()
    assert.not_equal(a, b)
    assert.equal("2", pg:psql(a, "SELECT 1 + 1"))
    pg:psql(a, "CREATE TABLE kept (x INT); INSERT INTO kept VALUES (42)")
    assert.has_error(function() pg:psql(b, "SELECT x FROM kept") end)
    pg:restart()
    assert.equal("42", pg:psql(a, "SELECT x FROM kept"))
  end)
end)
