-- --http-auth and --http-open: the secret file read once at start (its
-- errors exit 2 before any database, without the secret), every request
-- without the secret answered 401 with a challenge, and the two paths
-- --http-open may leave open; the Basic form in a real headless Chromium.
local H = require "support.helpers"
local http = require "support.http"

local WORKER = [[
local bmdb = require "bmdb"
return { bmdb.worker {
  process = "Guarded", poll = 0.2,
  select = function(tx, limit) return {} end,
  run = function(w) end,
} }
]]

local function chromium()
  for _, p in ipairs { "/usr/bin/chromium", "/usr/bin/chromium-browser" } do
    if H.read_file(p) then return p end
  end
end

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function base64(s)
  return ((s:gsub(".", function(c)
    local b, bits = c:byte(), ""
    for i = 8, 1, -1 do bits = bits .. (bit.band(b, 2 ^ (i - 1)) > 0 and "1" or "0") end
    return bits
  end) .. "0000"):gsub("%d%d%d?%d?%d?%d?", function(x)
    if #x < 6 then return "" end
    local n = 0
    for i = 1, 6 do n = n * 2 + (x:sub(i, i) == "1" and 1 or 0) end
    return B64:sub(n + 1, n + 1)
  end) .. ({ "", "==", "=" })[#s % 3 + 1])
end

describe("--http-auth", function()
  local dsn, dir, script
  local browser = chromium()
  local function dump(url)
    local code, out, err = H.run({ browser, "--headless", "--no-sandbox", "--disable-gpu",
      "--user-data-dir=" .. dir .. "/chromium", "--dump-dom", url }, { timeout = 120 })
    assert.equal(0, code, err)
    return out
  end
  local TOKEN = "tok-9f2c1e7a5b"
  local USER, PASSWORD = "alice", "pa:ss-7d41"

  local function start(extra)
    local argv = { H.bin, "--interval", "2", "--log-level", "debug", "--http", "127.0.0.1:0" }
    for _, a in ipairs(extra) do argv[#argv + 1] = a end
    argv[#argv + 1] = script
    local p = H.spawn { argv = argv, env = { BMDB_DSN = dsn } }
    p:await("stderr", "workers started", 30)
    local port = tonumber(p:stderr():match("http listening.-address=127%.0%.0%.1:(%d+)"))
    assert(port, "no port in the log:\n" .. p:stderr())
    return p, port
  end

  local function stop(p)
    p:kill("TERM")
    assert.equal(0, p:wait(30), p:stderr())
  end

  local function get(port, path, authorization)
    local status, headers, body = http.request(port, "GET", path,
      { headers = authorization and { Authorization = authorization } or nil })
    assert(status, "no answer from " .. path .. ": " .. tostring(headers))
    return status, headers, body
  end

  setup(function()
    dsn = H.postgres():create_db()
    assert.equal(0, (H.run({ H.bin, "migrate" }, { env = { BMDB_DSN = dsn } })))
    dir = H.tmpdir("httpauth")
    script = dir .. "/guarded.lua"
    H.write_file(script, WORKER)
    H.write_file(dir .. "/bearer", TOKEN .. "\n")
    H.write_file(dir .. "/basic", USER .. ":" .. PASSWORD .. "\r\n")
  end)

  it("refuses a missing, empty or unreadable file and a misused option, exit 2, before any database", function()
    H.write_file(dir .. "/empty", "")
    H.write_file(dir .. "/blank", "\n")
    H.write_file(dir .. "/two", "secret-first-line\nsecret-second-line\n")
    local cases = {
      { { "--http", "0", "--http-auth", dir .. "/missing" }, "--http-auth " .. dir .. "/missing: cannot read it" },
      { { "--http", "0", "--http-auth", dir }, "--http-auth " .. dir .. ": cannot read it" },
      { { "--http", "0", "--http-auth", dir .. "/empty" }, "--http-auth " .. dir .. "/empty: is empty" },
      { { "--http", "0", "--http-auth", dir .. "/blank" }, "--http-auth " .. dir .. "/blank: is empty" },
      { { "--http", "0", "--http-auth", dir .. "/two" }, "expected one line" },
      { { "--http-auth", dir .. "/bearer" }, "--http-auth needs --http" },
      { { "--http", "0", "--http-open", "healthz" }, "--http-open needs --http-auth" },
      { { "--http", "0", "--http-auth", dir .. "/bearer", "--http-open", "healthz,status" },
        "--http-open: expected healthz, metrics or healthz,metrics, got 'healthz,status'" },
      { { "--http", "0", "--http-auth", dir .. "/bearer", "--http-open", "" }, "--http-open: expected" },
    }
    for _, c in ipairs(cases) do
      local argv = { H.bin }
      for _, a in ipairs(c[1]) do argv[#argv + 1] = a end
      argv[#argv + 1] = script
      local code, out, err = H.run(argv, { env = { BMDB_DSN = "host=/nonexistent dbname=x" } })
      assert.equal(2, code, table.concat(c[1], " ") .. ": " .. err)
      assert.matches(c[2], err, 1, true)
      assert.is_nil((out .. err):find("secret-", 1, true), "the file's content is never shown: " .. err)
    end
    local code, help = H.run({ H.bin, "--help" })
    assert.equal(0, code)
    assert.matches("--http-auth FILE", help, 1, true)
    assert.matches("--http-open LIST", help, 1, true)
  end)

  it("answers 401 with a Bearer challenge to every request without the token, and serves it", function()
    local p, port = start { "--http-auth", dir .. "/bearer" }
    assert.matches("auth=on", p:stderr(), 1, true)
    for _, path in ipairs { "/", "/metrics", "/healthz", "/machine/00000000-0000-0000-0000-000000000000", "/nope" } do
      local status, headers, body = get(port, path)
      assert.equal(401, status, path)
      assert.equal('Bearer realm="bmdb-host"', headers["www-authenticate"])
      assert.matches("^unauthorized", body)
    end
    local wrong = { "Bearer " .. TOKEN .. "x", "Bearer " .. TOKEN:sub(1, -2), "Bearer", "Bearer ", TOKEN,
      "Basic " .. base64("x:" .. TOKEN), "Bearer " .. TOKEN:upper(), "Secret " .. TOKEN }
    for _, a in ipairs(wrong) do assert.equal(401, (get(port, "/", a)), a) end
    -- a POST without the token learns nothing either, not even the 405
    local fd = assert(http.connect(port))
    http.send(fd, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert.matches("^HTTP/1%.1 401", http.read_all(fd, 10))
    http.close(fd)

    if browser then -- what a browser shows: the refusal, none of the page
      local refused = dump("http://127.0.0.1:" .. port .. "/")
      assert.matches("unauthorized: this server wants the credentials of --http-auth", refused, 1, true)
      assert.is_nil(refused:find("<h2>", 1, true), refused)
    end
    local status, _, body = get(port, "/", "Bearer " .. TOKEN)
    assert.equal(200, status)
    assert.matches("<h1>bmdb-host: guarded</h1>", body, 1, true)
    assert.equal(200, (get(port, "/metrics", "bearer  " .. TOKEN))) -- the scheme in any case, spaces after it
    assert.equal(200, (get(port, "/healthz", "Bearer " .. TOKEN)))
    assert.equal(400, (get(port, "/machine/x", "Bearer " .. TOKEN)))
    stop(p)
    assert.is_nil(p:stderr():find(TOKEN, 1, true), "the token is never logged")
  end)

  it("--http-open leaves /healthz and /metrics open, each only when named, and nothing else", function()
    local p, port = start { "--http-auth", dir .. "/bearer", "--http-open", "healthz,metrics" }
    assert.equal(200, (get(port, "/healthz")))
    local status, _, body = get(port, "/metrics")
    assert.equal(200, status)
    assert.matches("bmdb_session_live 1", body, 1, true)
    assert.equal(401, (get(port, "/")))
    assert.equal(401, (get(port, "/healthz/")))
    assert.equal(401, (get(port, "/machine/00000000-0000-0000-0000-000000000000")))
    if browser then
      assert.matches("ok: session %S+ live", dump("http://127.0.0.1:" .. port .. "/healthz"))
      assert.matches("bmdb_session_live 1", dump("http://127.0.0.1:" .. port .. "/metrics"), 1, true)
      assert.matches("unauthorized", dump("http://127.0.0.1:" .. port .. "/"), 1, true)
    end
    stop(p)

    p, port = start { "--http-auth", dir .. "/bearer", "--http-open", "metrics" }
    assert.equal(200, (get(port, "/metrics")))
    assert.equal(401, (get(port, "/healthz")))
    assert.equal(401, (get(port, "/")))
    stop(p)
  end)

  it("user:password is Basic: a 401 page in headless Chromium without them, the status page with them", function()
    local p, port = start { "--http-auth", dir .. "/basic" }
    local status, headers = get(port, "/")
    assert.equal(401, status)
    assert.equal('Basic realm="bmdb-host", charset="UTF-8"', headers["www-authenticate"])
    assert.equal(401, (get(port, "/", "Basic " .. base64(USER .. ":" .. PASSWORD .. "x"))))
    assert.equal(401, (get(port, "/", "Basic " .. base64(USER .. ":"))))
    assert.equal(401, (get(port, "/", "Basic !!!")))
    assert.equal(401, (get(port, "/", "Bearer " .. USER .. ":" .. PASSWORD)))
    assert.equal(401, (get(port, "/", "Other " .. base64(USER .. ":" .. PASSWORD))))
    assert.equal(200, (get(port, "/", "Basic " .. base64(USER .. ":" .. PASSWORD))))
    assert.equal(200, (get(port, "/healthz", "basic " .. base64(USER .. ":" .. PASSWORD):gsub("=+$", ""))))

    if not browser then
      stop(p)
      pending("chromium is not installed (make check installs it: the check-deps target)")
      return
    end
    -- without them (or with a wrong password) Chromium gets the challenge,
    -- has no one to ask, and shows nothing of the page
    for _, url in ipairs { "http://127.0.0.1:" .. port .. "/", "http://" .. USER .. ":nope@127.0.0.1:" .. port .. "/" } do
      local refused = dump(url)
      assert.is_nil(refused:find("bmdb-host: guarded", 1, true), refused)
      assert.is_nil(refused:find("<h2>", 1, true), refused)
    end
    local page = dump("http://" .. USER .. ":" .. PASSWORD:gsub(":", "%%3A") .. "@127.0.0.1:" .. port .. "/")
    assert.matches("<h1>bmdb-host: guarded</h1>", page, 1, true)
    assert.matches("<h2>processes", page, 1, true)
    stop(p)
    assert.is_nil(p:stderr():find(PASSWORD, 1, true), "the password is never logged")
  end)
end)
