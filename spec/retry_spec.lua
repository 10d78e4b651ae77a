-- Retry: an operator ends backoffs now (bmdb-host retry, bmdb.retry),
-- with real hosts, a real PostgreSQL and the binary's command line.
local H = require "support.helpers"

describe("retry", function()
  local dsn, admin, dir

  local function cli(...)
    return H.run({ H.bin, ... }, { env = { BMDB_DSN = dsn } })
  end

  local function new_machine()
    return admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
  end

  -- A pair in backoff for an hour, that last failed `ago` seconds ago
  -- (default: now), with `cause`, after `attempts` failures.
  local function backoff(m, process, cause, ago, attempts)
    admin:exec([[INSERT INTO work_backoff (machine_id, process, backoff_until, last_seconds, attempts, cause)
                 VALUES ($1, $2, now() + (3600 - $3::INT8) * INTERVAL '1 second', 3600, $4::INT8, $5)]],
               m, process, ago or 0, attempts or 3, cause or "provider said 503")
  end

  local function in_backoff(m, process)
    return admin:one([[SELECT count(*) AS n FROM work_backoff WHERE machine_id = $1 AND process = $2
                       AND backoff_until > now()]], m, process).n == 1
  end

  local function retried(m, process)
    return admin:query([[SELECT cause FROM work_history WHERE machine_id = $1 AND process = $2
                         AND event = 'Retried']], m, process)
  end

  setup(function()
    dsn, admin = H.open_core("retry_spec")
    dir = H.tmpdir("retry")
    admin:exec("CREATE TABLE effects (machine_id UUID NOT NULL, what TEXT)")
    admin:exec("CREATE TABLE wanted (machine_id UUID NOT NULL, process TEXT NOT NULL)")
  end)

  teardown(function() H.close_core(admin) end)

  it("clears one pair's backoff: a worker claims it at once and runs it; the count is kept", function()
    H.write_file(dir .. "/worker.lua", [[
      local bmdb = require "bmdb"
      return bmdb.worker {
        process = "Reflash", poll = 60, -- idle until woken: the retry's notification must wake it
        select = function(tx, limit)
          return tx:query([=[SELECT w.machine_id FROM wanted w WHERE w.process = 'Reflash'
            AND NOT EXISTS (SELECT 1 FROM effects e WHERE e.machine_id = w.machine_id)
            AND NOT EXISTS (SELECT 1 FROM work_blocked b
              WHERE b.machine_id = w.machine_id AND b.process = 'Reflash') LIMIT $1]=], limit)
        end,
        run = function(w)
          w:finish(function(tx) tx:exec("INSERT INTO effects VALUES ($1, 'Reflash')", w.machine) end)
        end,
      }
    ]])
    local m, other = new_machine(), new_machine()
    backoff(m, "Reflash")
    admin:exec("INSERT INTO wanted VALUES ($1, 'Reflash')", m)
    local h = H.spawn { argv = { H.bin, "--interval", "2", dir .. "/worker.lua" }, env = { BMDB_DSN = dsn } }
    H.wait_until(function() return admin:one("SELECT count(*) AS n FROM sessions").n >= 2 end, 20, "the host's session")
    -- the host listens for wake-ups (its slot has found nothing it may claim)
    H.wait_until(function()
      return admin:one("SELECT count(*) AS n FROM pg_stat_activity WHERE query LIKE 'LISTEN%'").n > 0
    end, 20, "the host to listen")
    local code, out, err = cli("retry", m, "Reflash", "--reason", "provider is back")
    assert.equal(0, code, out .. err)
    assert.matches("retried", out)
    H.wait_until(function() return admin:one("SELECT count(*) AS n FROM effects WHERE machine_id = $1", m).n == 1 end,
      20, "the woken worker to run the retried item")
    h:kill("TERM")
    assert.equal(0, h:wait(30), h:stderr())
    local r = retried(m, "Reflash")
    assert.equal(1, #r)
    assert.equal("retried by an operator: provider is back", r[1].cause)
    -- a pair with no backoff: nothing to clear, exit 1
    code, out = cli("retry", other, "Reflash")
    assert.equal(1, code, out)
    assert.matches("not in backoff", out)
    -- the count survives the retry (until the item finished, which clears it)
    local k = new_machine()
    backoff(k, "Keep", nil, 0, 5)
    assert.equal(0, (cli("retry", k, "Keep")))
    local b = admin:one("SELECT attempts, last_seconds, backoff_until <= now() AS free FROM work_backoff WHERE machine_id = $1", k)
    assert.same({ 5, 3600, true }, { b.attempts, b.last_seconds, b.free })
  end)

  it("selects by process, cause substring and --since; --dry-run changes nothing and counts the same", function()
    local a1, a2, a3, a4, b1 = new_machine(), new_machine(), new_machine(), new_machine(), new_machine()
    backoff(a1, "Bulk", "provider said 503 at 01:02", 60)
    backoff(a2, "Bulk", "provider said 503 at 00:10", 3000)
    backoff(a3, "Bulk", "disk missing", 60)
    backoff(a4, "Bulk", "provider 50% gone", 30)
    backoff(b1, "Other", "provider said 503", 60)
    -- a2 failed 3000 s ago: before a --since of 30 minutes ago
    local since = admin:one("SELECT to_char((now() - INTERVAL '30 minutes') AT TIME ZONE 'UTC', " ..
                            "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS t").t
    local code, out, err = cli("retry", "--process", "Bulk", "--cause", "503", "--since", since, "--dry-run")
    assert.equal(0, code, out .. err)
    assert.matches("process Bulk: 1 pair would be retried", out, 1, true)
    for _, m in ipairs { a1, a2, a3, a4 } do assert.is_true(in_backoff(m, "Bulk")) end
    assert.equal(0, #retried(a1, "Bulk"))
    code, out, err = cli("retry", "--process", "Bulk", "--cause", "503", "--since", since, "--reason", "outage over")
    assert.equal(0, code, out .. err)
    assert.matches("process Bulk: 1 pair retried", out, 1, true)
    assert.same({ false, true, true, true }, { in_backoff(a1, "Bulk"), in_backoff(a2, "Bulk"),
                                              in_backoff(a3, "Bulk"), in_backoff(a4, "Bulk") })
    assert.equal("retried by an operator: outage over", retried(a1, "Bulk")[1].cause)
    -- the cause is a substring, not a pattern: "50%" matches only itself
    code, out = cli("retry", "--process", "Bulk", "--cause", "50%", "--dry-run")
    assert.matches("process Bulk: 1 pair would be retried", out, 1, true)
    -- by cause alone: a2 too; the other process is never touched
    code, out = cli("retry", "--process", "Bulk", "--cause", "503")
    assert.equal(0, code)
    assert.matches("process Bulk: 1 pair retried", out, 1, true)
    assert.is_false(in_backoff(a2, "Bulk"))
    code, out = cli("retry", "--process", "Bulk")
    assert.matches("process Bulk: 2 pairs retried", out, 1, true)
    assert.is_true(in_backoff(b1, "Other"))
    assert.equal(1, #retried(a3, "Bulk"))
    code, out = cli("retry", "--process", "Bulk")
    assert.equal(0, code)
    assert.matches("process Bulk: 0 pairs retried", out, 1, true)
    code, out = cli("history", a1)
    assert.matches("Retried", out)
  end)

  it("clears more pairs than a batch holds, in several transactions, and reports the total", function()
    admin:exec([[INSERT INTO machines (machine_id) SELECT gen_random_uuid() FROM generate_series(1, 2500)]])
    admin:exec([[INSERT INTO work_backoff (machine_id, process, backoff_until, last_seconds, attempts, cause)
                 SELECT machine_id, 'Many', now() + INTERVAL '1 hour', 3600, 1, 'x' FROM machines]])
    local n = admin:one("SELECT count(*) AS n FROM work_backoff WHERE process = 'Many'").n
    local code, out, err = cli("retry", "--process", "Many", "--dry-run")
    assert.equal(0, code, err)
    assert.matches("process Many: " .. n .. " pairs would be retried", out, 1, true)
    code, out = cli("retry", "--process", "Many")
    assert.matches("process Many: " .. n .. " pairs retried", out, 1, true)
    assert.equal(0, admin:one("SELECT count(*) AS n FROM work_backoff WHERE process = 'Many' AND backoff_until > now()").n)
    assert.equal(n, admin:one("SELECT count(*) AS n FROM work_history WHERE process = 'Many' AND event = 'Retried'").n)
  end)

  it("refuses a bad command line with exit 2, naming what is wrong", function()
    local m = new_machine()
    for _, case in ipairs {
      { { "retry", m, "P", "--frobnicate" }, "unknown option '--frobnicate'" },
      { { "retry", m }, "expected MACHINE PROCESS" },
      { { "retry", "--process" }, "option --process needs a value" },
      { { "retry", "not-a-uuid", "P" }, "machine id is not a UUID: not-a-uuid" },
      { { "retry", m, "bad name!" }, "invalid process name 'bad name!'" },
      { { "retry", m, "P", "--dry-run" }, "need --process" },
      { { "retry", "--process", "P", "--since", "yesterday-ish" }, "--since is not a timestamp: yesterday-ish" },
    } do
      local code, _, err = cli((table.unpack or unpack)(case[1]))
      assert.equal(2, code, table.concat(case[1], " ") .. ": " .. err)
      assert.matches(case[2], err, 1, true)
    end
  end)

  it("bmdb.retry from a one-off script: one pair and the bulk form", function()
    local m1, m2, m3 = new_machine(), new_machine(), new_machine()
    backoff(m1, "Lua", "provider said 503")
    backoff(m2, "Lua", "provider said 503")
    backoff(m3, "Lua", "disk missing")
    admin:exec([[INSERT INTO work_backoff (machine_id, process, backoff_until, last_seconds, attempts, cause)
                 SELECT machine_id, 'LuaMany', now() + INTERVAL '1 hour', 3600, 1, 'x' FROM machines]])
    local many = admin:one("SELECT count(*) AS n FROM work_backoff WHERE process = 'LuaMany'").n
    assert.is_true(many > 1000) -- more than one batch
    H.write_file(dir .. "/oneoff.lua", [[
      local bmdb = require "bmdb"
      local m1 = ...
      local one = bmdb.retry(m1, "Lua", "by hand")
      local again = bmdb.retry(m1, "Lua")
      local dry = bmdb.retry { process = "Lua", cause = "503", dry_run = true }
      local n = bmdb.retry { process = "Lua", cause = "503", reason = "outage over" }
      local ok, err = pcall(bmdb.retry, { process = "Lua", since = "not a time" })
      local ok2, err2 = pcall(bmdb.retry, { proces = "Lua" })
      local ok3, err3 = pcall(bmdb.retry, m1, "bad name!")
      print(one, again, dry, n, bmdb.is_error(err, "usage"), tostring(err))
      print(bmdb.is_error(err2, "usage"), tostring(err2))
      print(bmdb.is_error(err3, "usage"), tostring(err3))
      print(bmdb.retry { process = "LuaMany" })
    ]])
    local code, out, err = H.run({ H.bin, dir .. "/oneoff.lua", m1 }, { env = { BMDB_DSN = dsn } })
    assert.equal(0, code, out .. err)
    local l1, l2, l3, l4 = out:match("([^\n]*)\n([^\n]*)\n([^\n]*)\n([^\n]*)")
    assert.equal(tostring(many), l4)
    assert.matches("^true\tfalse\t1\t1\ttrue\t.*%-%-since is not a timestamp: not a time", l1)
    assert.matches("^true\t.*bad argument #1 to 'retry' %(unknown field \"proces\"%)", l2)
    assert.matches("^true\t.*bad argument #2 to 'retry' %(invalid process name", l3)
    assert.equal("retried by an operator: by hand", retried(m1, "Lua")[1].cause)
    assert.equal("retried by an operator: outage over", retried(m2, "Lua")[1].cause)
    assert.is_false(in_backoff(m2, "Lua"))
    assert.is_true(in_backoff(m3, "Lua"))
  end)

  it("migration 0008 goes down with Retried events in history, and up again", function()
    assert.is_true(admin:one("SELECT count(*) AS n FROM work_history WHERE event = 'Retried'").n > 0)
    -- down to before 0008: it and every core migration after it
    local newer = 0
    for f in io.popen("ls " .. H.root .. "/migrations"):lines() do
      local k = tonumber(f:match("^(%d+)_.*%.up%.sql$"))
      if k and k >= 8 then newer = newer + 1 end
    end
    local code, out, err = cli("migrate", "down", tostring(newer))
    assert.equal(0, code, out .. err)
    assert.equal(0, admin:one("SELECT count(*) AS n FROM work_history WHERE event = 'Retried'").n)
    local ok = pcall(admin.exec, admin, [[INSERT INTO work_history (machine_id, process, event)
                                          SELECT machine_id, 'X', 'Retried' FROM machines LIMIT 1]])
    assert.is_false(ok)
    code, out, err = cli("migrate", "up")
    assert.equal(0, code, out .. err)
  end)
end)
