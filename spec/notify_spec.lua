-- sd_notify: a real host with NOTIFY_SOCKET pointed at a Unix datagram
-- socket this spec binds, as systemd would.
local ffi = require "ffi"
local H = require "support.helpers"
require "support.http" -- declares socket, recv, poll and struct pollfd_h

ffi.cdef [[
struct sockaddr_un_n { unsigned short sun_family; char sun_path[108]; };
int bind(int fd, const void *addr, unsigned int len);
]]
local C = ffi.C
local AF_UNIX, SOCK_DGRAM = 1, 2

local function listen(path)
  local fd = C.socket(AF_UNIX, SOCK_DGRAM, 0)
  assert(fd >= 0, "socket failed")
  local sa = ffi.new("struct sockaddr_un_n")
  sa.sun_family = AF_UNIX
  ffi.copy(sa.sun_path, path)
  assert(C.bind(fd, sa, ffi.sizeof(sa)) == 0, "bind " .. path .. " failed")
  return fd
end

-- The datagrams that arrived within timeout seconds, each one message.
local function receive(fd, into, timeout)
  local buf = ffi.new("char[4096]")
  local pfd = ffi.new("struct pollfd_h[1]")
  local deadline = H.now() + timeout
  while H.now() < deadline do
    pfd[0].fd, pfd[0].events = fd, 1
    if C.poll(pfd, 1, 20) > 0 then
      local n = C.recv(fd, buf, 4096, 0)
      if n > 0 then into[#into + 1] = ffi.string(buf, n) end
    else
      return
    end
  end
end

describe("sd_notify", function()
  it("sends READY=1 once the workers run, WATCHDOG=1 from the heartbeat, STOPPING=1 on drain", function()
    local dsn = H.postgres():create_db()
    local dir = H.tmpdir("notify")
    local sock = dir .. "/notify.sock"
    local fd = listen(sock)
    H.write_file(dir .. "/idle.lua", [[
      local bmdb = require "bmdb"
      return { bmdb.worker { process = "Idle", poll = 1,
        select = function() return {} end, run = function() end } }
    ]])
    local p = H.spawn { argv = { H.bin, "--interval", "1", dir .. "/idle.lua" },
      env = { BMDB_DSN = dsn, NOTIFY_SOCKET = sock } }
    local got = {}
    local function seen(prefix)
      for i, m in ipairs(got) do
        for line in m:gmatch("[^\n]+") do
          if line:sub(1, #prefix) == prefix then return i end
        end
      end
    end
    H.wait_until(function()
      receive(fd, got, 0.1)
      return seen("READY=1") and #got > seen("READY=1") and seen("WATCHDOG=1")
    end, 30, "READY=1 then WATCHDOG=1")
    p:kill("TERM")
    H.wait_until(function()
      receive(fd, got, 0.1)
      return seen("STOPPING=1")
    end, 30, "STOPPING=1")
    assert.equal(0, p:wait(30), p:stderr())
    local ready, stopping = seen("READY=1"), seen("STOPPING=1")
    -- a watchdog ping after READY, and STOPPING last of the three
    local watchdog_after_ready
    for i = ready + 1, #got do
      if got[i]:find("WATCHDOG=1", 1, true) then watchdog_after_ready = i break end
    end
    assert.is_not_nil(watchdog_after_ready, table.concat(got, " | "))
    assert.is_true(ready < watchdog_after_ready and watchdog_after_ready < stopping, table.concat(got, " | "))
    assert.matches("STATUS=serving: 1 slot", got[ready], 1, true)
    assert.matches("STATUS=draining", got[stopping], 1, true)
    ffi.C.close(fd)
  end)
end)
