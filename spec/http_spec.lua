-- --http: /metrics, the status page (in a real headless Chromium), /healthz,
-- and hostile clients, against real hosts on a real PostgreSQL.
local H = require "support.helpers"
local http = require "support.http"
local core = require "bmdb.core"

-- The worker every test runs: machines listed in `wanted`, each with a
-- mode: 'ok' returns, 'hold' waits until its mode changes, 'fail' fails
-- with the row's cause.
local WORKER = [[
local bmdb = require "bmdb"
return { bmdb.worker {
  process = "Observe", poll = 0.1, concurrency = 2, backoff = { initial = 600 },
  select = function(tx, limit)
    return tx:query([=[SELECT machine_id FROM wanted w WHERE NOT EXISTS
      (SELECT 1 FROM work_blocked b WHERE b.machine_id = w.machine_id AND b.process = 'Observe')
      AND NOT EXISTS (SELECT 1 FROM work_history h WHERE h.machine_id = w.machine_id
                      AND h.event IN ('Finished', 'Failed'))
      LIMIT $1]=], limit)
  end,
  run = function(w)
    local row = bmdb.transact(function(tx)
      return tx:one("SELECT mode, cause FROM wanted WHERE machine_id = $1", w.machine)
    end)
    if row.mode == "fail" then return w:fail(row.cause) end
    while row.mode == "hold" do
      bmdb.sleep(0.05)
      row = bmdb.transact(function(tx) return tx:one("SELECT mode FROM wanted WHERE machine_id = $1", w.machine) end)
    end
  end,
} }
]]

local function chromium()
  for _, p in ipairs { "/usr/bin/chromium", "/usr/bin/chromium-browser" } do
    if H.read_file(p) then return p end
  end
end

describe("--http", function()
  local dsn, admin, dir, script

  local function want(mode, cause)
    local m = admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
    admin:exec("INSERT INTO wanted VALUES ($1, $2, $3)", m, mode or "ok", cause)
    return m
  end

  local function start(extra, env)
    local argv = { H.bin, "--interval", "2", "--http", "127.0.0.1:0" }
    for _, a in ipairs(extra or {}) do argv[#argv + 1] = a end
    argv[#argv + 1] = script
    local e = { BMDB_DSN = dsn }
    for k, v in pairs(env or {}) do e[k] = v end
    local p = H.spawn { argv = argv, env = e }
    p:await("stderr", "workers started", 30)
    local port = tonumber(p:stderr():match("http listening.-address=127%.0%.0%.1:(%d+)"))
    assert(port, "no port in the log:\n" .. p:stderr())
    return p, port
  end

  local function stop(p)
    p:kill("TERM")
    assert.equal(0, p:wait(30), p:stderr())
  end

  local function get(port, path)
    local status, headers, body = http.get(port, path)
    assert(status, "no answer from " .. path .. ": " .. tostring(headers))
    return status, headers, body
  end

  local function finished()
    return admin:one("SELECT count(*) AS n FROM work_history WHERE event = 'Finished'").n
  end

  -- Parses the text exposition: families (HELP and TYPE), and every
  -- sample, checked against them. Returns samples[name{labels}] = value.
  local function parse(text)
    local types, samples = {}, {}
    for line in text:gmatch("[^\n]+") do
      local what, name, rest = line:match("^# (%u+) ([%w_:]+) (.*)$")
      if what == "TYPE" then
        assert.is_nil(types[name], "family declared twice: " .. name)
        types[name] = rest
      elseif what ~= "HELP" then
        local series, value = line:match("^([%w_:]+%b{}) (%S+)$")
        if not series then series, value = line:match("^([%w_:]+) (%S+)$") end
        assert(series, "not a sample line: " .. line)
        assert(tonumber(value) or value == "+Inf" or value == "NaN", "bad value: " .. line)
        local n = series:match("^[%w_:]+")
        local family = types[n] and n or n:match("^(.*)_bucket$") or n:match("^(.*)_sum$") or n:match("^(.*)_count$")
        assert(types[family], "sample without a declared family: " .. line)
        if family ~= n then assert.equal("histogram", types[family], line) end
        assert.is_nil(samples[series], "duplicate series: " .. series)
        samples[series] = tonumber(value)
      end
    end
    return samples, types
  end

  setup(function()
    dsn = H.postgres():create_db()
    assert.equal(0, (H.run({ H.bin, "migrate" }, { env = { BMDB_DSN = dsn } })))
    admin = core.connect(dsn)
    admin:exec("CREATE TABLE wanted (machine_id UUID PRIMARY KEY REFERENCES machines, mode TEXT NOT NULL, cause TEXT)")
    dir = H.tmpdir("http")
    script = dir .. "/observe.lua"
    H.write_file(script, WORKER)
  end)

  teardown(function() admin:close() end)

  before_each(function()
    admin:exec("DELETE FROM wanted")
  end)

  it("refuses an address that is not numeric, before touching any database", function()
    local code, _, err = H.run({ H.bin, "--http", "example.org:80", script },
      { env = { BMDB_DSN = "host=/nonexistent dbname=x" } })
    assert.equal(2, code)
    assert.matches("--http: expected PORT", err, 1, true)
  end)

  it("/metrics moves while items run, and the exposition parses", function()
    local p, port = start()
    local status, headers, body = get(port, "/metrics")
    assert.equal(200, status)
    assert.matches("^text/plain; version=0%.0%.4", headers["content-type"])
    local before = parse(body)
    assert.equal(1, before["bmdb_session_live"])
    assert.equal(1, before["bmdb_sessions_started_total"])
    for _ = 1, 5 do want("ok") end
    local failing = want("fail", "boom")
    H.wait_until(function() return finished() == 5 end, 30, "five items finished")
    H.wait_until(function()
      local _, _, b = get(port, "/metrics")
      local s = parse(b)
      return (s['bmdb_work_ended_total{process="Observe",result="failed"}'] or 0) == 1
         and (s['bmdb_heartbeat_duration_seconds_count'] or 0) > (before['bmdb_heartbeat_duration_seconds_count'] or 0)
         and s['bmdb_fleet_machines_in_backoff{process="Observe"}'] == 1
    end, 20, "the failure, a heartbeat and the fleet's backoff in the metrics")
    local _, _, b = get(port, "/metrics")
    local after = parse(b)
    assert.equal(6, after['bmdb_work_started_total{process="Observe"}'])
    assert.equal(5, after['bmdb_work_ended_total{process="Observe",result="finished"}'])
    assert.equal(6, after['bmdb_work_duration_seconds_count{process="Observe"}'])
    assert.equal(6, after['bmdb_work_duration_seconds_bucket{process="Observe",le="+Inf"}'])
    assert.is_true(after['bmdb_transactions_committed_total'] > (before['bmdb_transactions_committed_total'] or 0))
    assert.is_true(after['bmdb_claims_empty_total{process="Observe"}'] > 0)
    assert.equal(2, after['bmdb_slots{process="Observe",state="idle"}'] + after['bmdb_slots{process="Observe",state="busy"}'])
    assert.is_true(after['bmdb_session_deadline_seconds'] > 0)
    assert.equal(1, after['bmdb_fleet_up'])
    assert.is_not_nil(after['bmdb_pool_connections{state="idle"}'])
    assert.equal(0, after['bmdb_reloads_total'])
    local _ = failing
    stop(p)
  end)

  it("/healthz turns 503 when the session is lost and 200 when a new one is live", function()
    local p, port = start()
    local status, _, body = get(port, "/healthz")
    assert.equal(200, status)
    local first = body:match("session (%S+) live")
    assert.is_not_nil(first, body)
    -- The heartbeat cannot write to sessions (neither poke nor start a new
    -- one) while this lock is held; slots' FOR KEY SHARE is not blocked.
    admin:exec("BEGIN")
    admin:exec("LOCK TABLE sessions IN SHARE MODE")
    local down = H.wait_until(function()
      local s, _, b = get(port, "/healthz")
      return s == 503 and b
    end, 20, "/healthz to say 503")
    assert.matches("^unavailable: ", down)
    assert.equal(1, select(2, down:gsub("\n", "")), "one line")
    admin:exec("ROLLBACK")
    local up = H.wait_until(function()
      local s, _, b = get(port, "/healthz")
      return s == 200 and b
    end, 20, "/healthz to say 200 again")
    local second = up:match("session (%S+) live")
    assert.is_not_nil(second)
    assert.are_not.equal(first, second)
    local _, _, m = get(port, "/metrics")
    assert.equal(1, parse(m)["bmdb_sessions_lost_total"])
    stop(p)
  end)

  it("answers other paths and methods without a page, and machine ids only as UUIDs", function()
    local p, port = start()
    assert.equal(404, (get(port, "/nope")))
    local status, _, body = get(port, "/machine/not-a-uuid")
    assert.equal(400, status)
    assert.matches("takes a machine id, a UUID", body, 1, true)
    assert.equal(400, (get(port, "/machine/00000000-0000-0000-0000-00000000000'%3B")))
    -- a UUID no table knows
    status, _, body = get(port, "/machine/00000000-0000-0000-0000-000000000000")
    assert.equal(404, status)
    assert.matches("no such machine", body, 1, true)
    local fd = assert(http.connect(port))
    http.send(fd, "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
    assert.matches("^HTTP/1%.1 405", http.read_all(fd, 10))
    http.close(fd)
    stop(p)
  end)

  describe("the status page in headless Chromium", function()
    local browser = chromium()
    local function dump(port, path)
      local code, out, err = H.run({ browser, "--headless", "--no-sandbox", "--disable-gpu",
        "--user-data-dir=" .. dir .. "/chromium", "--dump-dom", "http://127.0.0.1:" .. port .. path },
        { timeout = 120 })
      assert.equal(0, code, err)
      return out
    end

    it("shows this host's busy slot, a backoff with its cause, and a machine with its history, escaped", function()
      if not browser then
        pending("chromium is not installed (make check installs it: the check-deps target)")
        return
      end
      local held = want("hold")
      local hostile = "<script>alert('x')</script> \"quoted\" & 'single'\nsecond line " .. string.rep("A", 100000)
      local failed = want("fail", hostile)
      local p, port = start()
      H.wait_until(function()
        return admin:one("SELECT count(*) AS n FROM work WHERE machine_id = $1", held).n == 1
           and admin:one("SELECT count(*) AS n FROM work_backoff WHERE machine_id = $1", failed).n == 1
      end, 30, "one machine held and one in backoff")

      local dom = dump(port, "/")
      assert.matches("<h1>bmdb-host: observe</h1>", dom, 1, true)
      -- this host's slot, busy on the held machine, with a link to it
      assert.matches('<td>busy</td><td><a class="id" href="/machine/' .. held .. '">', dom, 1, true)
      -- the backoff, with its cause escaped and cut short
      assert.matches("&lt;script&gt;alert('x')&lt;/script&gt; \"quoted\" &amp; 'single' ⏎ second line", dom, 1, true)
      assert.matches("%(%d%d%d%d%d more bytes%)", dom)
      assert.is_nil(dom:find("<script", 1, true), "no script element")
      assert.is_true(#dom < 60000, "the 100 kB cause is cut: " .. #dom .. " bytes")

      local shot = dir .. "/status.png"
      local code, _, err = H.run({ browser, "--headless", "--no-sandbox", "--disable-gpu",
        "--user-data-dir=" .. dir .. "/chromium", "--window-size=412,915", "--screenshot=" .. shot,
        "http://127.0.0.1:" .. port .. "/" }, { timeout = 120 })
      assert.equal(0, code, err)
      assert.equal("\137PNG", (H.read_file(shot) or ""):sub(1, 4))

      local page = dump(port, "/machine/" .. failed)
      assert.matches("history, newest first", page, 1, true)
      assert.matches("<td>Failed</td>", page, 1, true)
      assert.matches("<td>Started</td>", page, 1, true)
      assert.matches("&lt;script&gt;", page, 1, true)
      assert.is_nil(page:find("<script", 1, true))
      admin:exec("UPDATE wanted SET mode = 'ok' WHERE machine_id = $1", held)
      stop(p)
    end)

    it("shows each process's counts, its latest failures linked to their machines, and the loops' holders", function()
      if not browser then
        pending("chromium is not installed (make check installs it: the check-deps target)")
        return
      end
      -- what earlier tests left (their hosts are stopped) would count too
      admin:exec("DELETE FROM work_backoff")
      admin:exec("DELETE FROM work_history")
      admin:exec("DELETE FROM loops") -- the retention loop of earlier tests' hosts
      local held = want("hold")
      local failed = want("fail", "first line of the cause\nsecond line")
      -- (without the host's retention loop: the page would list it too)
      local p, port = start { "--keep-history", "0" }
      H.wait_until(function()
        return admin:one("SELECT count(*) AS n FROM work WHERE machine_id = $1", held).n == 1
           and admin:one("SELECT count(*) AS n FROM work_backoff WHERE machine_id = $1", failed).n == 1
      end, 30, "one machine held and one in backoff")
      -- two older failures of another machine in the last hour, one of a day ago
      local other = want("ok")
      admin:exec([[INSERT INTO work_history (machine_id, process, event, cause, occurred_at)
        SELECT $1, 'Observe', 'Failed', 'older ' || i, now() - i * INTERVAL '10 minutes'
        FROM generate_series(1, 2) AS i]], other)
      admin:exec([[INSERT INTO work_history (machine_id, process, event, cause, occurred_at)
        VALUES ($1, 'Observe', 'Failed', 'a day ago', now() - INTERVAL '25 hours')]], other)
      local session = admin:one("SELECT session_id FROM sessions WHERE component_name = 'observe'").session_id
      admin:exec([[INSERT INTO loops (name, session_id, token, held_since, next_run_at, last_started_at,
          last_finished_at, failures, last_cause)
        VALUES ('reconcile', $1, gen_random_uuid(), now() - INTERVAL '5 minutes', now() + INTERVAL '1 hour',
          now() - INTERVAL '2 minutes', now() - INTERVAL '1 minute', 3, '<b>provider</b> down' || chr(10) || 'trace'),
          ('gauge:depth', gen_random_uuid(), gen_random_uuid(), now() - INTERVAL '1 day', now(), NULL, NULL, 0, NULL)]],
        session)
      admin:exec([[INSERT INTO loop_history (name, session_id, event, cause, occurred_at)
        VALUES ('reconcile', $1, 'Taken', NULL, now() - INTERVAL '5 minutes'),
               ('reconcile', $1, 'Failed', 'loop cause <i>x</i>', now() - INTERVAL '1 minute')]], session)

      local dom = dump(port, "/")
      -- processes: Observe has one in flight, one in backoff, 2 machines and 3 failures in the hour
      assert.matches("<tr><td>Observe</td><td>1</td><td>1</td><td>2</td><td>3</td></tr>", dom, 1, true)
      -- latest failures: newest first, each machine a link, the cause's first line only
      local f = dom:match("<h2>latest failures.-</table>")
      assert.is_not_nil(f, dom)
      local links = {}
      for id in f:gmatch('href="/machine/([%x%-]+)"') do links[#links + 1] = id end
      assert.same({ failed, other, other }, links)
      assert.matches("first line of the cause", f, 1, true)
      assert.is_nil(f:find("second line", 1, true))
      assert.matches("older 2", f, 1, true)
      assert.is_nil(f:find("a day ago", 1, true))
      -- loops: the live holder with its component, the free one as none
      local l = dom:match("<h2>loops %(2%)</h2>.-</table>")
      assert.is_not_nil(l, dom)
      assert.matches("<tr><td>gauge:depth</td><td class=\"muted\">none</td>", l, 1, true)
      assert.matches('<td>reconcile</td><td><span class="id">' .. session .. "</span><br>observe ", l, 1, true)
      assert.matches("<td>3</td><td>&lt;b&gt;provider&lt;/b&gt; down", l, 1, true)
      assert.matches("<td>in 59m %d%ds</td>", l)
      local e = dom:match("<h2>loop history.-</table>")
      assert.matches("<td>reconcile</td><td>[^<]* ago</td><td>Failed</td>", e)
      assert.matches("loop cause &lt;i&gt;x&lt;/i&gt;", e, 1, true)
      assert.is_nil(dom:find("<b>", 1, true))
      admin:exec("UPDATE wanted SET mode = 'ok' WHERE machine_id = $1", held)
      stop(p)
      admin:exec("DELETE FROM loop_history")
      admin:exec("DELETE FROM loops")
    end)

    it("shows a machine's newest 1000 events and says how many there are, its work and backoff", function()
      if not browser then
        pending("chromium is not installed (make check installs it: the check-deps target)")
        return
      end
      local failed = want("fail", "it broke")
      local p, port = start()
      H.wait_until(function()
        return admin:one("SELECT count(*) AS n FROM work_backoff WHERE machine_id = $1", failed).n == 1
      end, 30, "the machine in backoff")
      admin:exec([[INSERT INTO work_history (machine_id, process, event, cause, occurred_at)
        SELECT $1, 'Observe', 'Retried', 'old ' || i, now() - INTERVAL '1 day' - i * INTERVAL '1 second'
        FROM generate_series(1, 1200) AS i]], failed)
      local page = dump(port, "/machine/" .. failed)
      assert.matches("<dt>events</dt><dd>1202</dd>", page, 1, true)
      local hist = page:match("<h2>history, newest first %((%d+)%)</h2>")
      assert.equal("1000", hist)
      assert.matches("The newest 1000 of 1202 events only", page, 1, true)
      local t = page:match("<h2>history, newest first.-</table>")
      local _, rows = t:gsub("<tr><td>", "")
      assert.equal(1000, rows)
      -- newest first: the failure, then its start, then the oldest Retried kept
      local first, second = t:match("<td>Observe</td><td>(%u%l+)</td>.-<td>Observe</td><td>(%u%l+)</td>")
      assert.same({ "Failed", "Started" }, { first, second })
      assert.matches("old 998", t, 1, true)
      assert.is_nil(t:find("old 999<", 1, true))
      local b = page:match("<h2>backoffs %(1%)</h2>.-</table>")
      assert.matches("it broke", b, 1, true)
      stop(p)
    end)
  end)

  it("keeps working under a slowloris, an oversize request line and a flood of connections", function()
    local p, port = start()
    local function run_batch(n)
      local target = finished() + n -- read first: items finish as soon as they are wanted
      for _ = 1, n do want("ok") end
      local ok, err = pcall(H.wait_until, function() return finished() >= target end, 60, n .. " items finished")
      assert(ok, tostring(err) .. "\n" .. p:stderr())
    end
    local t0 = H.now()
    run_batch(20)
    local baseline = H.now() - t0

    -- slowloris: connections that send a header byte now and then
    local slow = {}
    for i = 1, 40 do
      local fd = http.connect(port)
      if fd then
        http.send(fd, "GET / HTTP/1.1\r\nHost: x\r\n")
        slow[#slow + 1] = fd
      end
      if i % 10 == 0 then for _, f in ipairs(slow) do http.send(f, "X-a: b\r\n") end end
    end
    -- a 10 MB request line, answered and closed rather than read whole
    local big = assert(http.connect(port))
    local sent_all = http.send(big, "GET /" .. string.rep("a", 10 * 1024 * 1024) .. " HTTP/1.1\r\n\r\n")
    local answer = http.read_all(big, 10)
    http.close(big)
    assert.is_true(not sent_all or answer:match("^HTTP/1%.1 4%d%d") ~= nil,
      "the oversize request was neither refused nor answered 4xx: " .. answer:sub(1, 100))
    -- a flood: a thousand connections opened and left open
    local flood = {}
    for _ = 1, 1000 do
      local fd = http.connect(port)
      if fd then flood[#flood + 1] = fd end
    end
    t0 = H.now()
    run_batch(20)
    local attacked = H.now() - t0
    assert.is_true(p:running(), p:stderr())
    for _, fd in ipairs(flood) do http.close(fd) end
    for _, fd in ipairs(slow) do http.close(fd) end
    -- the server serves again once they are gone
    H.wait_until(function() return http.get(port, "/healthz", 2) == 200 end, 30, "/healthz after the attack")
    print(string.format("\n  20 items: %.2fs alone, %.2fs under attack", baseline, attacked))
    stop(p)
  end)
end)
