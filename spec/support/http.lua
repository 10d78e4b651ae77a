-- support/http.lua -- a plain HTTP/1.1 client over loopback TCP for the
-- specs, on LuaJIT's FFI: a GET or any request, answers read one by one on
-- a keep-alive connection, and raw connections for the hostile clients
-- (slowloris, an oversize request line, a flood). Every read is bounded by
-- a timeout; nothing waits forever.
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

-- Bytes read past one answer by read_response, by socket: the start of
-- the next answer on a keep-alive connection.
local unread = {}

-- Reads until the peer closes or timeout seconds pass; returns what came,
-- and true when the peer closed (false when the time ran out).
function M.read_rest(fd, timeout)
  local buf, parts = ffi.new("char[65536]"), { unread[fd] }
  unread[fd] = nil
  local deadline = H.now() + (timeout or 10)
  local pfd = ffi.new("struct pollfd_h[1]")
  local closed = false
  while true do
    local left = deadline - H.now()
    if left <= 0 then break end
    pfd[0].fd, pfd[0].events = fd, POLLIN
    local r = C.poll(pfd, 1, math.floor(left * 1000) + 1)
    if r <= 0 then break end
    local n = C.recv(fd, buf, 65536, 0)
    if n <= 0 then
      closed = true
      break
    end
    parts[#parts + 1] = ffi.string(buf, n)
  end
  return table.concat(parts), closed
end

-- What came until the peer closed or timeout seconds passed.
function M.read_all(fd, timeout)
  return (M.read_rest(fd, timeout))
end

M.close = function(fd)
  unread[fd] = nil
  C.close(fd)
end

-- Reads one answer (its head, and a body of its Content-Length) from a
-- connection that stays open: status, headers (lower-case names), body;
-- nil, why when it does not come whole within timeout seconds.
function M.read_response(fd, timeout)
  local buf, have = ffi.new("char[65536]"), unread[fd] or ""
  unread[fd] = nil
  local deadline = H.now() + (timeout or 10)
  local pfd = ffi.new("struct pollfd_h[1]")
  while true do
    local head_end = have:find("\r\n\r\n", 1, true)
    if head_end then
      local head = have:sub(1, head_end - 1)
      local status = tonumber(head:match("^HTTP/1%.%d (%d+)"))
      local headers = {}
      for k, v in head:gmatch("\r\n([^:\r\n]+):%s*([^\r\n]*)") do headers[k:lower()] = v end
      local len = tonumber(headers["content-length"] or 0)
      if status and #have >= head_end + 3 + len then
        local rest = have:sub(head_end + 4 + len)
        if rest ~= "" then unread[fd] = rest end
        return status, headers, have:sub(head_end + 4, head_end + 3 + len)
      end
    end
    local left = deadline - H.now()
    if left <= 0 then return nil, "no whole answer in time: " .. have:sub(1, 200) end
    pfd[0].fd, pfd[0].events = fd, POLLIN
    if C.poll(pfd, 1, math.floor(left * 1000) + 1) > 0 then
      local n = C.recv(fd, buf, 65536, 0)
      if n <= 0 then return nil, "connection closed: " .. have:sub(1, 200) end
      have = have .. ffi.string(buf, n)
    end
  end
end

-- An answer read to the peer's close -> status, headers, body.
local function parse(raw)
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

-- One request on a connection of its own (closed after the answer):
-- method, path, opts {headers = {name = value}, body =, timeout =} ->
-- status, headers (lower-case names), body; nil, why when no answer came.
function M.request(port, method, path, opts)
  opts = opts or {}
  local fd, why = M.connect(port)
  if not fd then return nil, why end
  local lines = { method .. " " .. path .. " HTTP/1.1", "Host: 127.0.0.1", "Connection: close" }
  for k, v in pairs(opts.headers or {}) do lines[#lines + 1] = k .. ": " .. v end
  if opts.body then lines[#lines + 1] = "Content-Length: " .. #opts.body end
  M.send(fd, table.concat(lines, "\r\n") .. "\r\n\r\n" .. (opts.body or ""))
  local raw = M.read_all(fd, opts.timeout or 10)
  M.close(fd)
  return parse(raw)
end

-- GET path -> status, headers (lower-case names), body; nil, why when no
-- answer came.
function M.get(port, path, timeout)
  return M.request(port, "GET", path, { timeout = timeout })
end

return M
