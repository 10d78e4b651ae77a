-- The fake provider (examples/fake-provider/): a real HTTP/1.1 server the
-- examples, the specs and the benchmarks talk to. Real process, real
-- sockets; what it did is read from its answers, /_stats and its request
-- log, never from timings.
local H = require "support.helpers"
local http = require "support.http"
local P = require "support.provider"

-- The events of one path in the log, of one kind.
local function events(p, kind, path)
  local out = {}
  for _, e in ipairs(p:events(kind)) do
    if e.path == path then out[#out + 1] = e end
  end
  return out
end

local function request_head(method, path, extra)
  return method .. " " .. path .. " HTTP/1.1\r\nHost: 127.0.0.1\r\n" .. (extra or "") .. "\r\n"
end

describe("fake provider", function()
  after_each(P.stop_all)

  it("prints where it listens, answers JSON, and keeps a connection open for the next request", function()
    local p = P.start()
    assert.truthy(p.port > 0)
    assert.equal("listening on 127.0.0.1:" .. p.port .. "\n", p.proc:stdout())
    local fd = assert(http.connect(p.port))
    assert.truthy(http.send(fd, request_head("GET", "/_ping")))
    local status, headers, body = http.read_response(fd, 10)
    assert.equal(200, status)
    assert.equal("application/json", headers["content-type"])
    assert.equal("{}", body)
    -- the same connection again
    assert.truthy(http.send(fd, request_head("GET", "/_ping")))
    assert.equal(200, (http.read_response(fd, 10)))
    local s = p:stats()
    assert.equal(2, s.by_path["/_ping"])
    assert.equal(2, s.accepted) -- that connection and this GET /_stats
    -- Connection: close is honoured: the answer, then the end of the stream
    assert.truthy(http.send(fd, request_head("GET", "/_ping", "Connection: close\r\n")))
    local raw, closed = http.read_rest(fd, 10)
    http.close(fd)
    assert.matches("^HTTP/1%.1 200 OK\r\n.*\r\nConnection: close\r\n\r\n{}$", raw)
    assert.is_true(closed)
    assert.equal(404, (p:get("/nope")))
    assert.equal('{"error":"not found"}', select(3, p:get("/nope")))
  end)

  it("answers pipelined requests in order, a delayed one holding back the next", function()
    local p = P.start()
    local fd = assert(http.connect(p.port))
    assert.truthy(http.send(fd, request_head("GET", "/_sleep?ms=100") .. request_head("GET", "/_status?code=201")))
    local s1, _, b1 = http.read_response(fd, 10)
    local s2, _, b2 = http.read_response(fd, 10)
    http.close(fd)
    assert.same({ 200, "{}", 201, '{"status":201}' }, { s1, b1, s2, b2 })
    local sleep, status = events(p, "response", "/_sleep")[1], events(p, "response", "/_status")[1]
    assert.truthy(sleep.t >= events(p, "request", "/_sleep")[1].t + 0.1 - 0.001)
    assert.truthy(status.t >= sleep.t)
  end)

  it("creates devices, once per Idempotency-Key, lists, shows and reboots them", function()
    local p = P.start()
    local dev1 = '{"id":"dev-1","machine":"m-1","state":"provisioning"}'
    local status, headers, body = p:post("/devices", '{"machine": "m-1"}', { ["Idempotency-Key"] = "k1" })
    assert.same({ 201, dev1 }, { status, body })
    assert.equal("application/json", headers["content-type"])
    -- the same key: the same device, and no second one
    assert.same({ 200, dev1 }, { select(1, p:post("/devices", '{"machine": "m-1"}', { ["Idempotency-Key"] = "k1" })),
                                 select(3, p:post("/devices", '{"machine": "m-1"}', { ["Idempotency-Key"] = "k1" })) })
    assert.equal(1, p:stats().devices)
    local _, _, dev2 = p:post("/devices", '{ "note": "machine", "machine" : "m-2" }', { ["Idempotency-Key"] = "k2" })
    assert.equal('{"id":"dev-2","machine":"m-2","state":"provisioning"}', dev2)
    -- no key: a new device each time
    assert.equal(201, (p:post("/devices", '{"machine":"m-3"}')))
    assert.equal(201, (p:post("/devices", '{"machine":"m-3"}')))
    status, _, body = p:post("/devices", '{"machin": "m-1"}')
    assert.equal(400, status)
    assert.matches('^{"error":".*machine', body)
    assert.equal(4, p:stats().devices)

    status, _, body = p:get("/devices")
    assert.equal(200, status)
    assert.equal('{"devices":[' .. dev1 .. "," .. dev2 .. ',{"id":"dev-3","machine":"m-3","state":"provisioning"}'
      .. ',{"id":"dev-4","machine":"m-3","state":"provisioning"}]}', body)
    assert.same({ 200, dev2 }, { select(1, p:get("/devices/dev-2")), select(3, p:get("/devices/dev-2")) })
    assert.equal(404, (p:get("/devices/dev-5")))
    assert.equal(404, (p:get("/devices/dev-01")))
    assert.same({ 200, '{"id":"dev-1","state":"rebooting"}' },
      { select(1, p:post("/devices/dev-1/reboot")), select(3, p:post("/devices/dev-1/reboot")) })
    assert.equal('{"id":"dev-1","machine":"m-1","state":"rebooting"}', select(3, p:get("/devices/dev-1")))
    assert.equal(404, (p:post("/devices/dev-9/reboot")))
    assert.equal(405, (p:request("DELETE", "/devices/dev-1")))
  end)

  it("with --fail-every N fails every Nth provider request with 503, and /_config changes it", function()
    local p = P.start { fail_every = 3 }
    local got = {}
    for i = 1, 7 do
      got[i] = p:get("/devices")
      assert.equal(200, (p:get("/_ping"))) -- control endpoints are not the provider's API
    end
    assert.same({ 200, 200, 503, 200, 200, 503, 200 }, got)
    assert.equal(200, (p:get("/devices"))) -- the 8th
    local status, _, body = p:post("/devices", '{"machine":"m"}') -- the 9th
    assert.same({ 503, '{"error":"provider unavailable"}' }, { status, body })
    assert.equal(0, p:stats().devices) -- the failed create created nothing
    assert.same({ latency_ms = 0, fail_every = 2 }, p:config { fail_every = 2 })
    assert.same({ 200, 503, 200, 503 }, { (p:get("/devices")), (p:get("/devices")), (p:get("/devices")), (p:get("/devices")) })
    p:config { fail_every = 0 }
    assert.same({ 200, 200, 200 }, { (p:get("/devices")), (p:get("/devices")), (p:get("/devices")) })
    assert.equal(400, (p:post("/_config", '{"latency": 5}')))
  end)

  it("answers the provider's API no sooner than --latency, and /_config changes it", function()
    local p = P.start { latency = 150 }
    assert.equal(201, (p:post("/devices", '{"machine":"m"}')))
    assert.equal(200, (p:get("/devices/dev-1")))
    for _, path in ipairs { "/devices", "/devices/dev-1" } do
      local req, resp = events(p, "request", path)[1], events(p, "response", path)[1]
      assert.truthy(resp.t >= req.t + 0.150 - 0.001, path .. " answered before its latency")
    end
    p:config { latency_ms = 400 }
    assert.equal(200, (p:get("/devices")))
    local req, resp = events(p, "request", "/devices")[2], events(p, "response", "/devices")[2]
    assert.truthy(resp.t >= req.t + 0.400 - 0.001)
    assert.equal(200, (p:get("/_sleep?ms=250")))
    req, resp = events(p, "request", "/_sleep")[1], events(p, "response", "/_sleep")[1]
    assert.truthy(resp.t >= req.t + 0.250 - 0.001)
    assert.equal(400, (p:get("/_sleep")))
  end)

  it("holds /_hang until the client closes, and logs the close of an unanswered request", function()
    local p = P.start()
    local fd = assert(http.connect(p.port))
    assert.truthy(http.send(fd, request_head("GET", "/_hang")))
    H.wait_until(function() return #events(p, "hang", "/_hang") == 1 end, 10, "the hang event")
    assert.equal(1, p:stats().hanging) -- and others are answered meanwhile
    assert.same({}, events(p, "closed", "/_hang"))
    http.close(fd)
    H.wait_until(function() return #events(p, "closed", "/_hang") == 1 end, 10, "the closed event")
    local s = p:stats()
    assert.same({ 0, 1 }, { s.hanging, s.closed })
    assert.same({}, events(p, "response", "/_hang"))
    -- a delayed answer the client gave up on
    fd = assert(http.connect(p.port))
    assert.truthy(http.send(fd, request_head("GET", "/_sleep?ms=60000")))
    H.wait_until(function() return #events(p, "request", "/_sleep") == 1 end, 10, "the request event")
    http.close(fd)
    H.wait_until(function() return #events(p, "closed", "/_sleep") == 1 end, 10, "the closed event of /_sleep")
    assert.same({}, events(p, "response", "/_sleep"))
    local e = events(p, "closed", "/_sleep")[1]
    assert.same({ "closed", "GET", "/_sleep" }, { e.event, e.method, e.path })
    assert.is_nil(e.status)
  end)

  it("echoes a request as JSON, the body escaped", function()
    local p = P.start()
    local body = 'he said "hi"\n\\ \t\1 é \255'
    local fd = assert(http.connect(p.port))
    assert.truthy(http.send(fd, "PUT /_echo?a=1&b=x%20y HTTP/1.1\r\nHost: h\r\nX-Custom:  Some Value \r\n" ..
      "X-Dup: 1\r\nx-dup: 2\r\nContent-Length: " .. #body .. "\r\n\r\n" .. body))
    local status, headers, echoed = http.read_response(fd, 10)
    http.close(fd)
    assert.equal(200, status)
    assert.equal("application/json", headers["content-type"])
    assert.matches(',"peer_port":%d+}$', echoed)
    echoed = echoed:gsub(',"peer_port":%d+}$', "}")
    assert.equal('{"method":"PUT","path":"/_echo","query":"a=1&b=x%20y","headers":{"host":"h",' ..
      '"x-custom":"Some Value","x-dup":"1, 2","content-length":"' .. #body .. '"},' ..
      '"body":"he said \\"hi\\"\\n\\\\ \\t\\u0001 é \\u00ff"}', echoed)
  end)

  it("answers /_bytes, /_status and /_text as asked", function()
    local p = P.start()
    local status, headers, body = p:get("/_bytes?n=100000")
    assert.same({ 200, "text/plain", "100000" }, { status, headers["content-type"], headers["content-length"] })
    assert.equal(string.rep("x", 100000), body)
    assert.equal("", select(3, p:get("/_bytes?n=0")))
    assert.same({ 503, '{"status":503}' }, { select(1, p:get("/_status?code=503")), select(3, p:get("/_status?code=503")) })
    assert.equal(400, (p:get("/_status?code=abc")))
    status, headers, body = p:get("/_text")
    assert.same({ 200, "application/json", "not json" }, { status, headers["content-type"], body })
  end)

  it("answers Expect: 100-continue before the body is sent", function()
    local p = P.start()
    local fd = assert(http.connect(p.port))
    assert.truthy(http.send(fd, request_head("POST", "/_echo", "Expect: 100-continue\r\nContent-Length: 5\r\n")))
    assert.equal(100, (http.read_response(fd, 10)))
    assert.same({}, events(p, "request", "/_echo")) -- not a whole request yet
    assert.truthy(http.send(fd, "hello"))
    local status, _, body = http.read_response(fd, 10)
    http.close(fd)
    assert.equal(200, status)
    assert.matches('"body":"hello",', body)
  end)

  it("refuses chunked bodies, oversized heads and malformed requests, closing the connection", function()
    local p = P.start()
    local function raw(bytes)
      local fd = assert(http.connect(p.port))
      http.send(fd, bytes)
      local answer, closed = http.read_rest(fd, 10)
      http.close(fd)
      assert.is_true(closed)
      return tonumber(answer:match("^HTTP/1%.1 (%d+)"))
    end
    assert.equal(411, raw(request_head("POST", "/_echo", "Transfer-Encoding: chunked\r\n") .. "5\r\nhello\r\n0\r\n\r\n"))
    assert.equal(400, raw(request_head("GET", "/_ping", "X-Big: " .. string.rep("a", 9000) .. "\r\n")))
    assert.equal(400, raw("GET /_ping\r\n\r\n"))
    assert.equal(400, raw(request_head("POST", "/_echo", "Content-Length: five\r\n")))
    assert.equal(413, raw(request_head("POST", "/_echo", "Content-Length: 999999999\r\n")))
    -- and it still serves
    assert.equal(200, (p:get("/_ping")))
  end)

  it("holds 256 connections open at once and serves another meanwhile", function()
    local p = P.start()
    local fds = {}
    for i = 1, 256 do
      fds[i] = assert(http.connect(p.port))
      assert.truthy(http.send(fds[i], request_head("GET", "/_hang")))
    end
    H.wait_until(function() return p:stats().hanging == 256 end, 30, "256 hanging requests")
    assert.equal(257, p:stats().connections) -- those and this GET /_stats
    for _, fd in ipairs(fds) do http.close(fd) end
    H.wait_until(function()
      local s = p:stats()
      return s.hanging == 0 and s.closed == 256
    end, 30, "256 closed connections")
  end)

  it("stops cleanly on SIGTERM with connections open, and with its parent when asked", function()
    local p = P.start()
    local held = assert(http.connect(p.port))
    assert.truthy(http.send(held, request_head("GET", "/_hang")))
    H.wait_until(function() return p:stats().hanging == 1 end, 10, "the hanging request")
    assert.equal(0, p:stop())
    local _, closed = http.read_rest(held, 10)
    http.close(held)
    assert.is_true(closed)

    -- --die-with-parent: a shell starts it and is killed
    local sh = H.spawn { argv = { "sh", "-c", '"$0" --die-with-parent & echo "pid $!"; wait', P.bin } }
    local pid
    H.wait_until(function()
      local out = sh:stdout()
      pid = out:match("pid (%d+)")
      return pid and out:find("listening on", 1, true)
    end, 10, "the provider under a shell")
    sh:kill("KILL")
    sh:wait(10)
    local ok, err = pcall(H.wait_until, function()
      local stat = H.read_file("/proc/" .. pid .. "/stat")
      return stat == nil or stat:match("^%d+ %b() (%a)") == "Z"
    end, 10, "the provider to exit with its parent")
    if not ok then H.signal(tonumber(pid), "KILL") end
    assert(ok, err)
  end)

  it("refuses a non-loopback --host and bad numbers", function()
    local code, _, err = H.run { P.bin, "--host", "10.1.2.3" }
    assert.equal(2, code)
    assert.matches("loopback", err)
    code = H.run { P.bin, "--latency", "-5" }
    assert.equal(2, code)
  end)
end)
