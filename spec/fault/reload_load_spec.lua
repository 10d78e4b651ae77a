-- Fault suite, guarantee 7: reloads under load. A host with --watch works
-- steadily while its script is saved again and again: a valid version,
-- then at once a broken one (a syntax error, or an invalid worker
-- definition) while slots are still inside items of the previous code.
-- Every item in flight completes; after each valid save every slot runs
-- exactly that code (never a refused one, never stuck on an older one).
local H = require "support.helpers"
local F = require "support.faults"

describe("fault: reload under load", function()
  it("keeps every item in flight and every slot on the last validated code", function()
    local dsn, admin = F.database()
    local dir = H.tmpdir("fault-reload")
    local path = dir .. "/fault.lua"
    H.write_file(path, F.script { version = "v1" })
    F.machines(admin, 40, 1000000)
    local h = F.host(dsn, "reloadA", path, { args = { "--watch" }, env = { CONC = "4", HOLD = "0.3", FIXED = "1" } })
    h:await("stderr", "workers started", 30)
    local slots = H.wait_until(function()
      local rows = admin:query("SELECT DISTINCT slot FROM intervals")
      return #rows == 4 and rows
    end, 60, "all four slots to finish an item")

    local function on_version(v)
      local n = 0
      for _, s in ipairs(slots) do
        -- (a slot may have run several items of v by the time the last one
        -- runs its first: any number counts)
        if admin:one("SELECT EXISTS (SELECT 1 FROM intervals WHERE slot = $1 AND version = $2) AS x",
                     s.slot, v).x then n = n + 1 end
      end
      return n == #slots
    end
    local reloads, refused, rounds = 0, 0, 8
    for k = 2, rounds + 1 do
      local v = "v" .. k
      H.write_file(path, F.script { version = v })
      reloads = reloads + 1
      H.wait_until(function() return F.count_lines(h, "msg=reloaded") >= reloads end, 30, "reload to " .. v)
      -- saved again while slots are still in items of the previous code
      if k % 2 == 0 then
        H.write_file(path, F.script { version = "broken" .. k, body = "this is not Lua (" })
      else
        H.write_file(path, F.script { version = "invalid" .. k, fields = "batch = 0," })
      end
      refused = refused + 1
      H.wait_until(function() return F.count_lines(h, "reload refused") >= refused end, 30, "the broken save to be refused")
      local ok, err = pcall(H.wait_until, function() return on_version(v) end, 60,
        "every slot to run " .. v .. " (the last code validated)")
      if not ok then
        local log = {}
        for l in h:stderr():gmatch("[^\n]+") do
          if l:match("reload") or l:match("slot") then log[#log + 1] = l end
        end
        error(err .. "\n" .. table.concat(log, "\n"), 0)
      end
    end
    h:kill("TERM")
    assert.equal(0, h:wait(60), h:stderr())

    local versions = {}
    for _, r in ipairs(admin:query("SELECT DISTINCT version FROM intervals")) do versions[#versions + 1] = r.version end
    table.sort(versions)
    for _, v in ipairs(versions) do assert.matches("^v%d+$", v, "a slot ran code that was refused: " .. v) end
    -- per slot, the code only moves forward
    local backwards = 0
    for _, s in ipairs(slots) do
      local last = 0
      for _, r in ipairs(admin:query("SELECT version FROM intervals WHERE slot = $1 ORDER BY started_at", s.slot)) do
        local n = tonumber(r.version:match("%d+"))
        if n < last then backwards = backwards + 1 end
        last = n
      end
    end
    assert.equal(0, backwards, "a slot went back to older code")
    assert.not_matches("reload failed in a slot", h:stderr(), 1, true)
    assert.not_matches("slot stopped by an error", h:stderr(), 1, true)
    -- every item in flight completed: nothing failed, lost or cancelled
    assert.equal(0, admin:count("SELECT 1 FROM work_history WHERE event NOT IN ('Started', 'Finished')"))
    assert.equal(0, F.count_lines(h, 'msg="work lost"'))
    local a = F.audit(admin, F.committed(h))
    F.figures("reload under load", { items = a.items, faults = reloads + refused, survived = reloads + refused,
      lost = a.lost, overlaps = a.overlaps + a.twice })
    print(string.format("\n  %d items across %d reloads and %d refused saves", a.items, reloads, refused))
    F.assert_clean(admin, F.committed(h))
    admin:close()
  end)
end)
