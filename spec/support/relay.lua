-- support/relay.lua -- a PostgreSQL connection relay that loses one answer
-- to COMMIT, for specs of an outcome the host cannot know.
--
--   luajit spec/support/relay.lua LISTEN_DIR SERVER_DIR [SKIP [MEMBERS [claim|finish|none]]]
--
-- It listens on LISTEN_DIR/.s.PGSQL.5432 and relays every connection to
-- SERVER_DIR/.s.PGSQL.5432, byte for byte. It reads the server's messages
-- (a type byte, then a length) and watches for the host's lock statement:
-- a row description naming machine_id, token and attempts, then a row. The
-- first COMMIT that completes on a connection after such a row (after
-- SKIP such COMMITs passed untouched, 0 by default), in a transaction
-- that opened at least MEMBERS savepoints (0 by default; a batch of k
-- finishes opens one per member, host/sched.h), has committed on the
-- server, but its CommandComplete never reaches the client: the relay
-- closes both ends instead, once, and writes LISTEN_DIR/fired. Every
-- other connection, and every connection after that, is relayed
-- untouched.
--
-- With `finish`, the COMMIT need not follow a lock: any COMMIT of a
-- transaction that opened at least MEMBERS (at least 1) savepoints, that
-- is a finish's, counts. With `none`, no answer is lost: the relay only
-- relays (a spec that stops it with SIGSTOP, to hang the route).
local ffi = require "ffi"
local bit = require "bit"

ffi.cdef [[
struct sockaddr_un { unsigned short sun_family; char sun_path[108]; };
struct pollfd { int fd; short events; short revents; };
int socket(int domain, int type, int protocol);
int bind(int fd, const void *addr, unsigned int len);
int listen(int fd, int backlog);
int accept(int fd, void *addr, void *len);
int connect(int fd, const void *addr, unsigned int len);
long read(int fd, void *buf, unsigned long n);
long send(int fd, const void *buf, unsigned long n, int flags);
int close(int fd);
int poll(struct pollfd *fds, unsigned long n, int timeout);
]]
local C = ffi.C
local AF_UNIX, SOCK_STREAM, POLLIN, MSG_NOSIGNAL = 1, 1, 1, 0x4000

local listen_dir, server_dir = arg[1], arg[2]
local skip, members, finish = tonumber(arg[3] or 0), tonumber(arg[4] or 0), arg[5] == "finish"
assert(listen_dir and server_dir and skip and members
       and (finish or arg[5] == nil or arg[5] == "claim" or arg[5] == "none"),
  "usage: relay.lua LISTEN_DIR SERVER_DIR [SKIP [MEMBERS [claim|finish|none]]]")

local function address(dir)
  local a = ffi.new("struct sockaddr_un")
  a.sun_family = AF_UNIX
  ffi.copy(a.sun_path, dir .. "/.s.PGSQL.5432")
  return a
end

local listener = C.socket(AF_UNIX, SOCK_STREAM, 0)
assert(listener >= 0 and C.bind(listener, address(listen_dir), ffi.sizeof("struct sockaddr_un")) == 0
  and C.listen(listener, 64) == 0, "cannot listen in " .. listen_dir)

local function send_all(fd, s)
  local p, left = ffi.cast("const char *", s), #s
  while left > 0 do
    -- MSG_NOSIGNAL: a peer that shut its socket down (the host cuts the
    -- connections of a lost session) must not kill the relay with SIGPIPE
    local n = C.send(fd, p, left, MSG_NOSIGNAL)
    if n <= 0 then return false end
    p, left = p + n, left - n
  end
  return true
end

local fired = arg[5] == "none" -- (as if it had fired: it never will)
local pairs_ = {} -- each: { client =, server =, pending = bytes from the server not yet whole, lock = , armed =,
                  --        savepoints = opened since the last COMMIT or ROLLBACK }

local function close_pair(p)
  C.close(p.client)
  C.close(p.server)
  p.closed = true
end

-- The server's complete messages in p.pending go to the client, but for
-- the one COMMIT this relay exists to lose.
local function from_server(p, data)
  p.pending = p.pending .. data
  local out, pos = {}, 1
  while #p.pending - pos + 1 >= 5 do
    local b = { p.pending:byte(pos + 1, pos + 4) }
    local len = bit.bor(bit.lshift(b[1], 24), bit.lshift(b[2], 16), bit.lshift(b[3], 8), b[4])
    if #p.pending - pos + 1 < 1 + len then break end
    local kind, body = p.pending:sub(pos, pos), p.pending:sub(pos + 5, pos + len)
    if kind == "T" then
      p.lock = body:find("machine_id\0", 1, true) and body:find("token\0", 1, true)
        and body:find("attempts\0", 1, true) and true or false
    elseif kind == "Z" then
      p.lock = false -- a PREPARE's description is not a lock that ran
    elseif kind == "D" and p.lock and p.savepoints >= members then
      p.armed = true
    elseif kind == "C" then
      p.lock = false
      if body:sub(1, 9) == "SAVEPOINT" then p.savepoints = p.savepoints + 1 end
      -- (ROLLBACK TO SAVEPOINT's tag is ROLLBACK too: a spec with MEMBERS
      -- must not have a member roll back)
      if body:sub(1, 8) == "ROLLBACK" then p.armed, p.savepoints = false, 0 end
      if body:sub(1, 6) == "COMMIT" then
        if finish then p.armed = p.savepoints >= math.max(members, 1) end
        if p.armed and not fired and skip == 0 then
          fired = true
          send_all(p.client, table.concat(out))
          close_pair(p)
          local f = io.open(listen_dir .. "/fired", "w")
          f:write("fired\n")
          f:close()
          return
        elseif p.armed and not fired then
          skip = skip - 1
        end
        p.armed, p.savepoints = false, 0
      end
    end
    out[#out + 1] = p.pending:sub(pos, pos + len)
    pos = pos + 1 + len
  end
  p.pending = p.pending:sub(pos)
  if #out > 0 and not send_all(p.client, table.concat(out)) then close_pair(p) end
end

local buf = ffi.new("char[65536]")
while true do
  local live = {}
  for _, p in ipairs(pairs_) do if not p.closed then live[#live + 1] = p end end
  pairs_ = live
  local fds = ffi.new("struct pollfd[?]", 1 + 2 * #pairs_)
  fds[0].fd, fds[0].events = listener, POLLIN
  for i, p in ipairs(pairs_) do
    fds[2 * i - 1].fd, fds[2 * i - 1].events = p.client, POLLIN
    fds[2 * i].fd, fds[2 * i].events = p.server, POLLIN
  end
  local polled = #pairs_ -- a pair accepted below has no entry in fds until the next round
  if C.poll(fds, 1 + 2 * polled, 1000) > 0 then
    if fds[0].revents ~= 0 then
      local client = C.accept(listener, nil, nil)
      local server = C.socket(AF_UNIX, SOCK_STREAM, 0)
      if client >= 0 and C.connect(server, address(server_dir), ffi.sizeof("struct sockaddr_un")) == 0 then
        pairs_[#pairs_ + 1] = { client = client, server = server, pending = "", savepoints = 0 }
      else
        C.close(client)
        C.close(server)
      end
    end
    for i = 1, polled do
      local p = pairs_[i]
      if not p.closed and fds[2 * i - 1].revents ~= 0 then
        local n = C.read(p.client, buf, 65536)
        if n <= 0 or not send_all(p.server, ffi.string(buf, n)) then close_pair(p) end
      end
      if not p.closed and fds[2 * i].revents ~= 0 then
        local n = C.read(p.server, buf, 65536)
        if n <= 0 then close_pair(p) else from_server(p, ffi.string(buf, n)) end
      end
    end
  end
end
