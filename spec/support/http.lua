-- support/http.lua -- a plain HTTP/1.1 client over loopback TCP for the
-- specs, on LuaJIT's FFI: a GET, and raw connections for the hostile
-- clients (slowloris, an oversize request line, a flood). Every read is
-- bounded by a timeout; nothing waits forever.
local ffi = require "ffi"
local H = require "support.helpers" -- declares close() among others

ffi.cdef [[
struct sockaddr_in_h { unsigned short sin_family; unsigned short sin_port; unsigned int sin_addr; char zero[8]; };
struct pollfd_h { int fd; short events; short revents; };
int socket(int domain, int type, int protocol);
int connect(int fd, const void *addr, unsigned int len);
long send(int fd, const void *buf, size_t n, int flags);
long recv(int fd, void *buf, size_t n, int flags);
int poll(struct pollfd_h *fds, unsigned long n, int timeout);
]]
local C = ffi.C
local AF_INET, SOCK_STREAM, MSG_NOSIGNAL, POLLIN = 2, 1, 0x4000, 1

local M = {}

local function htons(p) return bit.bor(bit.lshift(bit.band(p, 0xff), 8), bit.rshift(p, 8)) end

-- A connected socket to 127.0.0.1:port, or nil and why.
function M.connect(port)
  local fd = C.socket(AF_INET, SOCK_STREAM, 0)
  if fd < 0 then return nil, "socket failed" end
  local sa = ffi.new("struct sockaddr_in_h")
  sa.sin_family = AF_INET
  sa.sin_port = htons(port)
  sa.sin_addr = 0x0100007f -- 127.0.0.1, network order on little-endian
  if C.connect(fd, sa, ffi.sizeof(sa)) ~= 0 then
    C.close(fd)
    return nil, "connect failed"
  end
  return fd
end

function M.send(fd, s)
  local off = 0
  while off < #s do
    local n = C.send(fd, ffi.cast("const char *", s) + off, #s - off, MSG_NOSIGNAL)
    if n <= 0 then return false end
    off = off + tonumber(n)
  end
  return true
end

-- Reads until the peer closes or timeout seconds pass; returns what came.
function M.read_all(fd, timeout)
  local buf, parts = ffi.new("char[65536]"), {}
  local deadline = H.now() + (timeout or 10)
  local pfd = ffi.new("struct pollfd_h[1]")
  while true do
    local left = deadline - H.now()
    if left <= 0 then break end
    pfd[0].fd, pfd[0].events = fd, POLLIN
    local r = C.poll(pfd, 1, math.floor(left * 1000) + 1)
    if r <= 0 then break end
    local n = C.recv(fd, buf, 65536, 0)
    if n <= 0 then break end
    parts[#parts + 1] = ffi.string(buf, n)
  end
  return table.concat(parts)
end

M.close = function(fd) C.close(fd) end

-- GET path -> status, headers (lower-case names), body; nil, why when no
-- answer came.
function M.get(port, path, timeout)
  local fd, why = M.connect(port)
  if not fd then return nil, why end
  M.send(fd, "GET " .. path .. " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
  local raw = M.read_all(fd, timeout or 10)
  C.close(fd)
  local head, body = raw:match("^(.-)\r\n\r\n(.*)$")
  if not head then return nil, "no complete answer: " .. raw:sub(1, 200) end
  local status = tonumber(head:match("^HTTP/1%.%d (%d+)"))
  local headers = {}
  for k, v in head:gmatch("\r\n([^:\r\n]+):%s*([^\r\n]*)") do headers[k:lower()] = v end
  if headers["transfer-encoding"] == "chunked" then
    local out, rest = {}, body
    while true do
      local size, after = rest:match("^(%x+)[^\r\n]*\r\n(.*)$")
      if not size or tonumber(size, 16) == 0 then break end
      out[#out + 1] = after:sub(1, tonumber(size, 16))
      rest = after:sub(tonumber(size, 16) + 3)
    end
    body = table.concat(out)
  end
  return status, headers, body
end

return M
