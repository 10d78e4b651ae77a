-- bmdb.http.request: a body's HTTP calls, against a real HTTP server (the
-- fake provider, spec/support/provider.lua), stop with the body's lock:
-- its timeout, an operator's cancel, the session's loss, the host's
-- shutdown. The server's log says when it saw a connection closed.
local H = require "support.helpers"
local P = require "support.provider"

describe("bmdb.http", function()
  local dsn, admin, dir, srv

  setup(function()
    dsn, admin = H.open_core("http_client_spec")
    dir = H.tmpdir("http_client")
    admin:exec("CREATE TABLE wanted (machine_id UUID NOT NULL, process TEXT NOT NULL)")
    srv = P.start()
  end)

  teardown(function()
    srv:stop()
    H.close_core(admin)
  end)

  local function start_host(script, env, args)
    local e = { BMDB_DSN = dsn }
    for k, v in pairs(env or {}) do e[k] = v end
    local argv = { H.bin, "--interval", "2" }
    for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
    argv[#argv + 1] = script
    return H.spawn { argv = argv, env = e }
  end

  local function one_off(name, body, env)
    local path = dir .. "/" .. name .. ".lua"
    H.write_file(path, "local bmdb = require 'bmdb'\nlocal URL = " .. string.format("%q", srv.url) .. "\n" .. body)
    local e = { BMDB_DSN = dsn }
    for k, v in pairs(env or {}) do e[k] = v end
    return H.run({ H.bin, path }, { env = e, timeout = 60 })
  end

  -- A worker over `wanted` rows of its process whose body is `body`.
  local function worker_script(name, process, body, extra)
    local path = dir .. "/" .. name .. ".lua"
    H.write_file(path, [[
      local bmdb = require "bmdb"
      local URL = ]] .. string.format("%q", srv.url) .. [[
      -- The kind of error a request raised. The request's own raise spends
      -- the interrupt the host set on the body, so the body can go on to
      -- log it (and a body could clean up).
      local function ended(url)
        local ok, e = pcall(bmdb.http.request, { url = url })
        return e and e.kind
      end
      return { bmdb.worker {
        process = ]] .. string.format("%q", process) .. [[, poll = 0.2, ]] .. (extra or "") .. [[
        select = function(tx, limit)
          return tx:query([=[SELECT w.machine_id FROM wanted w WHERE w.process = $2
            AND NOT EXISTS (SELECT 1 FROM work_history h WHERE h.machine_id = w.machine_id
                            AND h.process = $2 AND h.event IN ('Finished', 'Canceled', 'Failed'))
            AND NOT EXISTS (SELECT 1 FROM work_blocked b WHERE b.machine_id = w.machine_id
                            AND b.process = $2) LIMIT $1]=], limit, ]] .. string.format("%q", process) .. [[)
        end,
        run = function(w) ]] .. body .. [[ end,
      } }
    ]])
    return path
  end

  -- Each machine is wanted by one process, so its history is that process's.
  local function new_machine(process)
    local m = admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
    admin:exec("INSERT INTO wanted VALUES ($1, $2)", m, process)
    return m
  end

  local function closed_hangs() return #srv:events("closed") end

  it("sends a request and returns the response, JSON decoded; an HTTP error status is a response", function()
    local code, out, err = one_off("basic", [[
      local r = bmdb.http.request { method = "POST", url = URL .. "/_echo?x=1", json = { a = 1, b = "two" },
                                    headers = { ["X-Trace"] = "t-1" }, timeout = 5 }
      print("status", r.status, r.headers["content-type"])
      print("method", r.json.method, r.json.query, r.json.headers["x-trace"], r.json.headers["content-type"])
      print("body", r.json.body)
      local n = bmdb.http.request { url = URL .. "/nowhere" }
      print("missing", n.status, n.json.error)
      local t = bmdb.http.request { url = URL .. "/_text" }
      print("lying", t.status, t.json, t.json_error ~= nil, t.body)
    ]])
    assert.equal(0, code, err)
    assert.matches("status\t200\tapplication/json", out, 1, true)
    assert.matches("method\tPOST\tx=1\tt%-1\tapplication/json", out)
    assert.matches('body\t{"a":1,"b":"two"}', out, 1, true)
    assert.matches("missing\t404\tnot found", out, 1, true)
    assert.matches("lying\t200\tnil\ttrue\tnot json", out, 1, true)
  end)

  it("raises kind http with a reason for transport failures, never naming a password or Authorization", function()
    local code, out, err = one_off("errors", [[
      local function try(opts)
        local ok, e = pcall(bmdb.http.request, opts)
        assert(not ok, "expected an error")
        print(e.kind, e.reason, tostring(e))
      end
      try { url = "http://127.0.0.1:1/refused" }
      try { url = URL .. "/_bytes?n=100000", max_body = 1000 }
      try { url = "http://admin:hunter2secret@127.0.0.1:" .. URL:match(":(%d+)$") .. "/_hang", timeout = 0.5,
            headers = { Authorization = "Bearer tok-sekrit-77" } }
      local ok, e = pcall(bmdb.http.request, { url = "ftp://x/" })
      print("bad", e.kind, tostring(e))
      ok, e = pcall(bmdb.http.request, { url = URL, headers = { ["X-A"] = "a\r\nInjected: 1" } })
      print("bad", e.kind, tostring(e))
      ok, e = pcall(bmdb.http.request, { url = URL, tiemout = 3 })
      print("bad", e.kind, tostring(e))
    ]])
    assert.equal(0, code, err)
    assert.matches("http\tconnect\thttp: GET http://127.0.0.1:1/refused: ", out, 1, true)
    assert.matches("http\ttoo_large\t[^\n]*max_body %(1000 bytes%)", out)
    assert.matches("http\ttimeout\thttp: GET http://127.0.0.1:%d+/_hang: no answer within 0.5s", out)
    assert.matches("bad\tusage\t[^\n]*url must be an http:// or https:// URL", out)
    assert.matches("bad\tusage\t[^\n]*value of X%-A must be a string without CR, LF or NUL", out)
    assert.matches("bad\tusage\t[^\n]*tiemout is not an option", out)
    for _, secret in ipairs { "hunter2secret", "tok%-sekrit%-77", "admin:" } do
      assert.is_nil(out:find(secret), "stdout names " .. secret)
      assert.is_nil(err:find(secret), "the log names " .. secret)
    end
  end)

  it("reuses a slot's connection across requests (keep-alive)", function()
    local code, out, err = one_off("keepalive", [[
      local ports = {}
      for i = 1, 5 do ports[#ports + 1] = bmdb.http.request { url = URL .. "/_echo" }.json.peer_port end
      print("ports", table.concat(ports, ","))
    ]])
    assert.equal(0, code, err)
    local first = out:match("ports\t(%d+),")
    assert.is_truthy(first, out)
    assert.equal(("ports\t" .. (first .. ","):rep(4) .. first), out:match("ports\t[%d,]+"))
  end)

  it("aborts a request in flight when the item's timeout takes its lock; the slot goes on", function()
    local before = closed_hangs()
    local script = worker_script("timeout", "Hang", [[
      local marker = ]] .. string.format("%q", dir .. "/hung") .. [[
      if not io.open(marker) then -- the first item only
        io.open(marker, "w"):close()
        bmdb.log.info("request ended", { kind = ended(URL .. "/_hang"), alive = w:alive() })
      end
    ]], "timeout = 1, backoff = { initial = 1 },")
    local a, b = new_machine("Hang"), new_machine("Hang")
    local h = start_host(script)
    h:await("stderr", 'msg="request ended" alive=false kind=lost', 30)
    H.wait_until(function() return closed_hangs() > before end, 10, "the server to see the connection closed")
    -- the one slot takes the other machine (or the same one's retry) next
    H.wait_until(function()
      local done = 0
      for _, m in ipairs { a, b } do
        for _, ev in ipairs(H.events(admin, m)) do if ev == "Finished" then done = done + 1 end end
      end
      return done >= 1
    end, 30, "the slot to finish an item after the aborted one")
    h:kill("TERM")
    assert.equal(0, h:wait(40), h:stderr())
    assert.is_nil(h:stderr():find("slot stuck"), "a slot was stuck")
  end)

  it("aborts a request in flight on an operator's cancel, and starts no request after it", function()
    local before = closed_hangs()
    local pings = srv:stats().by_path["/_sleep"] or 0
    local script = worker_script("cancel", "Loop", [[
      local n = 0
      local ok, first = pcall(function()
        while true do
          bmdb.http.request { url = URL .. "/_sleep?ms=50" }
          n = n + 1
          if n == 5 then bmdb.log.info("five requests done") end
        end
      end)
      -- once lost, no request starts: the next one raises at once
      local ok2, e2 = pcall(bmdb.http.request, { url = URL .. "/_sleep?ms=50" })
      bmdb.log.info("requests stopped", { kind = first.kind, n = n, again = e2 and e2.kind })
    ]])
    local m = new_machine("Loop")
    local h = start_host(script)
    h:await("stderr", "five requests done", 30)
    local code, _, err = H.run({ H.bin, "cancel", m, "Loop" }, { env = { BMDB_DSN = dsn } })
    assert.equal(0, code, err)
    h:await("stderr", 'msg="requests stopped" again=lost kind=lost', 30)
    local n = tonumber(h:stderr():match('msg="requests stopped" again=lost kind=lost n=(%d+)'))
    -- every request the body completed, and at most the one the cancel
    -- aborted: none after the loss was known
    local got = srv:stats().by_path["/_sleep"] - pings
    assert.is_true(got == n or got == n + 1, ("server got %d, body completed %d"):format(got, n))
    h:kill("TERM")
    assert.equal(0, h:wait(40), h:stderr())
    assert.same({ "Started", "Canceled" }, H.events(admin, m))
    assert.is_true(closed_hangs() >= before) -- (the aborted one was a sleep, not a hang)
  end)

  it("aborts a request in flight when the session is lost (the database unreachable)", function()
    local before = closed_hangs()
    local relay = H.relay(dsn)
    local script = worker_script("session", "Sess", [[
      bmdb.log.info("requesting")
      bmdb.log.info("request ended", { kind = ended(URL .. "/_hang") })
    ]])
    new_machine("Sess")
    local h = H.spawn { argv = { H.bin, "--interval", "2", script }, env = { BMDB_DSN = relay.dsn } }
    h:await("stderr", "requesting", 30)
    H.wait_until(function() return #srv:events("hang") > 0 end, 10, "the request to reach the server")
    relay.freeze()
    h:await("stderr", 'msg="request ended" kind=session_expired', 30)
    H.wait_until(function() return closed_hangs() > before end, 10, "the server to see the connection closed")
    relay.thaw()
    h:kill("TERM")
    assert.equal(0, h:wait(40), h:stderr())
  end)

  it("lets a request run through the drain's grace, then aborts it; the host exits 0", function()
    local before = closed_hangs()
    local script = worker_script("drain", "Drain", [[
      bmdb.log.info("requesting")
      bmdb.log.info("request ended", { kind = ended(URL .. "/_hang") })
    ]])
    local m = new_machine("Drain")
    local h = start_host(script, {}, { "--grace", "1" })
    h:await("stderr", "requesting", 30)
    H.wait_until(function() return #srv:events("hang") > 0 end, 10, "the request to reach the server")
    h:kill("TERM")
    assert.equal(0, h:wait(40), h:stderr())
    assert.matches('msg="request ended" kind=canceled', h:stderr())
    assert.is_true(closed_hangs() > before, "the server saw no connection closed")
    assert.same({ "Started", "Canceled" }, H.events(admin, m))
  end)
end)
