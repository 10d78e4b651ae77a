-- bmdb.metrics: an operator's own counters, gauges and histograms, their
-- rules at definition, one registry shared by every Lua state of a host,
-- and their series on a real host's /metrics, scraped over HTTP.
local H = require "support.helpers"
local http = require "support.http"
local core = require "bmdb.core"
local bmdb = require "bmdb"
local K = core.kinds

-- Items of mode 'ok' count themselves; 'extras' also sets the gauge,
-- observes the histogram and counts an escaped label value; 'cap' counts
-- 1005 label values of one family (the cap is 1000). Every state defines
-- the counter again, in its body too: the host keeps one family.
local WORKER = [[
local bmdb = require "bmdb"
local items = bmdb.metrics.counter("op_items_total", "Items done, by mode.", { "mode" })
local temp = bmdb.metrics.gauge("op_temperature", "A gauge.")
local lat = bmdb.metrics.histogram("op_step_seconds", "A histogram.", { "step" }, { 0.1, 1 })
local esc = bmdb.metrics.counter("op_escaped_total", "Label values, escaped.", { "v" })
local many = bmdb.metrics.counter("op_many_total", "Too many series.", { "i" })
return { bmdb.worker {
  process = "Count", poll = 0.1, concurrency = 4,
  select = function(tx, limit)
    return tx:query([=[SELECT machine_id FROM wanted w WHERE NOT EXISTS
      (SELECT 1 FROM work_history h WHERE h.machine_id = w.machine_id AND h.event = 'Finished')
      LIMIT $1]=], limit)
  end,
  run = function(w)
    local mode = bmdb.transact(function(tx)
      return tx:one("SELECT mode FROM wanted WHERE machine_id = $1", w.machine).mode
    end)
    bmdb.sleep(0.01)
    bmdb.metrics.counter("op_items_total", "Items done, by mode.", { "mode" }):inc(mode)
    if mode == "extras" then
      temp:set(10); temp:inc(5); temp:dec(2); temp:dec()
      lat:observe(0.05, "a"); lat:observe(0.5, "a"); lat:observe(3, "a"); lat:observe(1, "b")
      esc:inc(2, 'a"b\\c\nd')
    elseif mode == "cap" then
      for i = 1, 1005 do many:inc(i) end
    end
  end,
} }
]]

local function usage(fn, ...)
  local err = H.failure(fn, ...)
  assert(bmdb.is_error(err, K.usage), "not a usage error: " .. tostring(err))
  return err.message
end

describe("bmdb.metrics", function()
  local M = bmdb.metrics

  describe("refuses at definition, with a usage error naming the rule", function()
    it("an invalid metric name", function()
      for _, name in ipairs { "", "9lives", "a-b", "a b", "é" } do
        assert.matches("invalid metric name '" .. name:gsub("%p", "%%%0") .. "'", usage(M.counter, name, "h"))
      end
      assert.matches("invalid metric name", usage(M.gauge, ("x"):rep(129), "h"))
      M.counter("ok:with_colon_total", "h") -- colons are Prometheus' own
    end)

    it("the host's bmdb_ prefix", function()
      assert.matches("prefix bmdb_ is the host's own", usage(M.counter, "bmdb_mine_total", "h"))
      assert.matches("prefix bmdb_", usage(M.histogram, "bmdb_x", "h"))
    end)

    it("an invalid, reserved, repeated label, and le on a histogram", function()
      assert.matches("invalid label name 'a:b'", usage(M.counter, "lab1_total", "h", { "a:b" }))
      assert.matches("invalid label name '1a'", usage(M.counter, "lab1_total", "h", { "1a" }))
      assert.matches("label name '__x' starts with __", usage(M.counter, "lab1_total", "h", { "__x" }))
      assert.matches("label 'a' is listed twice", usage(M.gauge, "lab1", "h", { "a", "b", "a" }))
      assert.matches("cannot have the label 'le'", usage(M.histogram, "lab1_seconds", "h", { "le" }))
      M.counter("lab2_total", "h", { "le" }) -- a counter may
      assert.matches("label 1 must be a string", usage(M.counter, "lab1_total", "h", { 3 }))
    end)

    it("bad buckets", function()
      assert.matches("increasing", usage(M.histogram, "bk_seconds", "h", nil, { 1, 1 }))
      assert.matches("not a finite number", usage(M.histogram, "bk_seconds", "h", nil, { 1, math.huge }))
      assert.matches("0 buckets", usage(M.histogram, "bk_seconds", "h", nil, {}))
    end)

    it("a redefinition that differs, naming the difference; the same one is the same family", function()
      M.counter("redef_total", "Help.", { "a", "b" })
      assert.matches("already defined as a counter, not a gauge", usage(M.gauge, "redef_total", "Help.", { "a", "b" }))
      assert.matches("another help text %('Help.', not 'Other.'%)", usage(M.counter, "redef_total", "Other.", { "a", "b" }))
      assert.matches("other labels %(%(a, b%), not %(a%)%)", usage(M.counter, "redef_total", "Help.", { "a" }))
      assert.matches("other labels %(%(a, b%), not %(b, a%)%)", usage(M.counter, "redef_total", "Help.", { "b", "a" }))
      M.histogram("redef_seconds", "H.", nil, { 1, 2 })
      assert.matches("other buckets", usage(M.histogram, "redef_seconds", "H.", nil, { 1, 3 }))
      M.histogram("redef_seconds", "H.", nil, { 1, 2 })
      M.counter("redef_total", "Help.", { "a", "b" }):inc("x", "y")
    end)

    it("the wrong number or type of label values, naming the metric", function()
      local c = M.counter("vals_total", "h", { "kind" })
      assert.matches("metric 'vals_total': inc wants %[n,%] 1 label value, got 0", usage(c.inc, c))
      assert.matches("metric 'vals_total': inc wants %[n,%] 1 label value, got 3", usage(c.inc, c, 1, "a", "b"))
      assert.matches("metric 'vals_total': the value of label 'kind' must be a string or a number, got table",
        usage(c.inc, c, {}))
      assert.matches("a counter goes up only", usage(c.inc, c, -1, "a"))
      local g = M.gauge("vals_gauge", "h", { "a", "b" })
      assert.matches("metric 'vals_gauge': set wants a number and 2 label values, got 2", usage(g.set, g, "x", "y"))
      local h = M.histogram("vals_seconds", "h")
      assert.matches("metric 'vals_seconds': observe wants a number first, got string", usage(h.observe, h, "x"))
      c:inc("a"); c:inc(3, 7); g:set(1, "x", "y"); g:inc("x", "y"); g:dec(2, "x", "y"); h:observe(0.2)
    end)

    it("at the caller's line", function()
      local ok, err = pcall(function() M.counter("bmdb_here", "h") end)
      assert.is_false(ok)
      assert.matches("op_metrics_spec.lua:%d+: metric name 'bmdb_here'", err.message)
    end)
  end)

  describe("on a host's /metrics", function()
    local dsn, admin, dir

    setup(function()
      dsn = H.postgres():create_db()
      assert.equal(0, (H.run({ H.bin, "migrate" }, { env = { BMDB_DSN = dsn } })))
      admin = core.connect(dsn)
      admin:exec("CREATE TABLE wanted (machine_id UUID PRIMARY KEY REFERENCES machines, mode TEXT NOT NULL)")
      dir = H.tmpdir("opmetrics")
      H.write_file(dir .. "/count.lua", WORKER)
    end)

    teardown(function() admin:close() end)

    local function want(n, mode)
      for _ = 1, n do
        local m = admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
        admin:exec("INSERT INTO wanted VALUES ($1, $2)", m, mode)
      end
    end

    local function finished()
      return admin:one("SELECT count(*) AS n FROM work_history WHERE event = 'Finished'").n
    end

    it("shows one series per label value across 4 slots, gauges, histograms, escapes, and caps", function()
      want(40, "ok"); want(1, "extras"); want(2, "cap")
      local p = H.spawn { argv = { H.bin, "--interval", "2", "--http", "127.0.0.1:0", dir .. "/count.lua" },
                          env = { BMDB_DSN = dsn } }
      p:await("stderr", "workers started", 30)
      local port = tonumber(p:stderr():match("http listening.-address=127%.0%.0%.1:(%d+)"))
      assert(port, p:stderr())
      H.wait_until(function() return finished() == 43 end, 60, "every item finished")
      local status, _, body = http.get(port, "/metrics")
      assert.equal(200, status)
      p:kill("TERM")
      assert.equal(0, p:wait(30), p:stderr())

      -- after the host's own
      assert(body:find("# TYPE bmdb_fleet_up gauge", 1, true) < body:find("# TYPE op_items_total", 1, true))
      assert.matches("\n# HELP op_items_total Items done, by mode%.\n# TYPE op_items_total counter\n", body)
      local function lines(prefix)
        local t = {}
        for l in body:gmatch("[^\n]+") do
          if l:sub(1, #prefix) == prefix then t[#t + 1] = l end
        end
        return t
      end
      assert.same({ 'op_items_total{mode="ok"} 40' }, lines('op_items_total{mode="ok"}'))
      assert.same({ 'op_items_total{mode="extras"} 1' }, lines('op_items_total{mode="extras"}'))
      assert.same({ 'op_items_total{mode="cap"} 2' }, lines('op_items_total{mode="cap"}'))
      assert.same({ "# TYPE op_temperature gauge", "op_temperature 12" }, { lines("# TYPE op_temperature")[1], lines("op_temperature ")[1] })
      assert.same({
        'op_step_seconds_bucket{step="a",le="0.1"} 1',
        'op_step_seconds_bucket{step="a",le="1"} 2',
        'op_step_seconds_bucket{step="a",le="+Inf"} 3',
        'op_step_seconds_bucket{step="b",le="0.1"} 0',
        'op_step_seconds_bucket{step="b",le="1"} 1',
        'op_step_seconds_bucket{step="b",le="+Inf"} 1',
      }, lines("op_step_seconds_bucket"))
      assert.same({ 'op_step_seconds_sum{step="a"} 3.55', 'op_step_seconds_sum{step="b"} 1' }, lines("op_step_seconds_sum"))
      assert.same({ 'op_step_seconds_count{step="a"} 3', 'op_step_seconds_count{step="b"} 1' }, lines("op_step_seconds_count"))
      assert.same({ 'op_escaped_total{v="a\\"b\\\\c\\nd"} 2' }, lines("op_escaped_total{"))
      -- the cap: 1000 series, the first 1000 values; the rest dropped, logged once
      local cap = lines("op_many_total{")
      assert.equal(1000, #cap)
      for _, l in ipairs(cap) do
        local i, v = l:match('^op_many_total{i="(%d+)"} (%d+)$')
        assert(i and tonumber(i) <= 1005 and v == "2", l)
      end
      local _, warned = p:stderr():gsub("too many series[^\n]*op_many_total", "")
      assert.equal(1, warned, p:stderr())
    end)

    it("keeps a reloaded script's series, and refuses a reload that redefines a metric differently", function()
      admin:exec("CREATE TABLE wanted_rel (machine_id UUID PRIMARY KEY REFERENCES machines)")
      local function rel(n)
        for _ = 1, n do
          local m = admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
          admin:exec("INSERT INTO wanted_rel VALUES ($1)", m)
        end
      end
      local function done()
        return admin:one("SELECT count(*) AS n FROM work_history WHERE process = 'Rel' AND event = 'Finished'").n
      end
      local path = dir .. "/rel.lua"
      local function script(version, help)
        return string.format([[
local bmdb = require "bmdb"
local c = bmdb.metrics.counter("rel_items_total", %q, { "version" })
return { bmdb.worker {
  process = "Rel", poll = 0.1, concurrency = 2,
  select = function(tx, limit)
    return tx:query("SELECT machine_id FROM wanted_rel w WHERE NOT EXISTS (SELECT 1 FROM work_history h "
      .. "WHERE h.machine_id = w.machine_id AND h.process = 'Rel' AND h.event = 'Finished') LIMIT $1", limit)
  end,
  run = function(w) c:inc(%q) end,
} }
]], help, version)
      end
      H.write_file(path, script("v1", "Items."))
      local p = H.spawn { argv = { H.bin, "--interval", "2", "--http", "127.0.0.1:0", path }, env = { BMDB_DSN = dsn } }
      p:await("stderr", "workers started", 30)
      local port = tonumber(p:stderr():match("http listening.-address=127%.0%.0%.1:(%d+)"))
      rel(3)
      H.wait_until(function() return done() == 3 end, 30, "v1's items")
      H.write_file(path, script("v2", "Items."))
      p:kill("HUP")
      p:await("stderr", "msg=reloaded generation=2 ")
      rel(3)
      H.wait_until(function() return done() == 6 end, 30, "v2's items")
      H.write_file(path, script("v3", "Other help."))
      p:kill("HUP")
      p:await("stderr", "reload refused")
      assert.matches("metric 'rel_items_total' is already defined with another help text", p:stderr(), 1, true)
      rel(1)
      H.wait_until(function() return done() == 7 end, 30, "an item after the refusal")
      local status, _, body = http.get(port, "/metrics")
      assert.equal(200, status)
      p:kill("TERM")
      assert.equal(0, p:wait(30), p:stderr())
      assert.matches('\nrel_items_total{version="v1"} 3\n', body, 1, true)
      assert.matches('\nrel_items_total{version="v2"} 4\n', body, 1, true)
      assert.not_matches("v3", body, 1, true)
    end)

    it("work the same in a one-off script, with no --http", function()
      H.write_file(dir .. "/once.lua", [[
local bmdb = require "bmdb"
local c = bmdb.metrics.counter("once_total", "h", { "k" })
c:inc("a"); c:inc(2, "a")
local ok, err = pcall(c.inc, c)
print(ok, bmdb.is_error(err, "usage"))
]])
      local code, out, err = H.run({ H.bin, dir .. "/once.lua" }, { env = { BMDB_DSN = dsn } })
      assert.equal(0, code, err)
      assert.equal("false\ttrue\n", out)
    end)
  end)
end)
