-- The benchmark harness (`make bench`), checked without running it and
-- without timing anything: the worker scripts it runs are valid for this
-- host, and the peer's runner parses and rejects bad arguments.
local H = require "support.helpers"

describe("make bench", function()
  it("runs worker scripts that `bmdb-host check` accepts", function()
    local scripts = assert(loadfile(H.root .. "/bench/run.lua"))("scripts")
    local dir = H.tmpdir("bench")
    local names = {}
    for name, text in pairs(scripts) do
      names[#names + 1] = name
      local path = dir .. "/" .. name .. ".lua"
      H.write_file(path, text)
      local code, out, err = H.run({ H.bin, "check", path })
      assert.equal(0, code, name .. ": " .. err)
      assert.matches("ok", out .. err)
    end
    table.sort(names)
    assert.same({ "noop", "noop_exec", "noop_no_ahead", "reload", "scale", "wake" }, names)
  end)

  it("pins the peer's version in package.json and in its lock file alike", function()
    local pkg = H.read_file(H.root .. "/bench/peer/package.json")
    local lock = H.read_file(H.root .. "/bench/peer/package-lock.json")
    local pinned = pkg:match('"graphile%-worker"%s*:%s*"([^"]+)"')
    assert.matches("^%d+%.%d+%.%d+$", pinned) -- an exact version, not a range
    local locked = lock:match('"node_modules/graphile%-worker"%s*:%s*{%s*"version"%s*:%s*"([^"]+)"')
    assert.equal(pinned, locked)
  end)

  -- Node.js is installed by `make bench` only; without it there is nothing to check.
  local node = os.execute("command -v node >/dev/null 2>&1")
  local check = (node == 0 or node == true) and it or pending

  check("has a peer runner that parses and rejects bad arguments before connecting", function()
    local runner = H.root .. "/bench/peer/run.js"
    local code, _, err = H.run({ "node", "--check", runner })
    assert.equal(0, code, err)
    code, _, err = H.run({ "node", runner, "ten", "4", "default" }, { env = { PGHOST = false, PGDATABASE = false } })
    assert.equal(2, code)
    assert.matches("JOBS must be a positive integer", err)
    code, _, err = H.run({ "node", runner, "10", "4", "fast" })
    assert.equal(2, code)
    assert.matches("the mode must be default or batched", err)
  end)
end)
