-- support/helpers.lua -- the spec harness: real processes, real files, a
-- real PostgreSQL. Built on LuaJIT's FFI so it needs nothing but busted.
--
-- Nothing here sleeps and hopes: wait_until() polls a condition with a
-- bounded timeout and names what it waited for when it gives up.
local ffi = require "ffi"

ffi.cdef [[
typedef int pid_t;
typedef unsigned int uid_t;
typedef unsigned int gid_t;
struct timespec { long tv_sec; long tv_nsec; };
int clock_gettime(int clk, struct timespec *ts);
int nanosleep(const struct timespec *req, struct timespec *rem);
pid_t fork(void);
int execve(const char *path, char *const argv[], char *const envp[]);
void _exit(int status);
pid_t waitpid(pid_t pid, int *status, int options);
int kill(pid_t pid, int sig);
int setpgid(pid_t pid, pid_t pgid);
int open(const char *path, int flags, int mode);
int dup2(int oldfd, int newfd);
int close(int fd);
int chdir(const char *path);
int write(int fd, const void *buf, size_t n);
char *mkdtemp(char *template);
int chmod(const char *path, int mode);
uid_t geteuid(void);
int setgroups(size_t size, const gid_t *list);
int setgid(gid_t gid);
int setuid(uid_t uid);
pid_t getpid(void);
char *strerror(int errnum);
]]
local C = ffi.C

local H = {}

local O_RDONLY, O_WRONLY, O_CREAT, O_TRUNC = 0, 1, 64, 512
local WNOHANG = 1
local SIGNALS = { HUP = 1, INT = 2, KILL = 9, TERM = 15, USR1 = 10, CONT = 18, STOP = 19 }
H.signals = SIGNALS

local function script_dir()
  local src = debug.getinfo(1, "S").source:sub(2)
  local dir = src:match("^(.*)/spec/support/helpers%.lua$")
  if dir == nil or dir == "" then dir = "." end
  if dir:sub(1, 1) ~= "/" then dir = (os.getenv("PWD") or ".") .. "/" .. dir end
  return (dir:gsub("/%./", "/"):gsub("/%.$", ""))
end

H.root = script_dir()
-- BMDB_HOST_BIN: another build of the binary (make check-asan)
H.bin = os.getenv("BMDB_HOST_BIN") or H.root .. "/build/bmdb-host"

function H.now()
  local ts = ffi.new("struct timespec")
  C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) / 1e9
end

function H.sleep(seconds)
  local ts = ffi.new("struct timespec")
  ts.tv_sec = math.floor(seconds)
  ts.tv_nsec = (seconds - math.floor(seconds)) * 1e9
  C.nanosleep(ts, nil)
end

-- what: the condition, named in the error on time-out (or a function
-- that names it then, to say what was last seen); step: seconds between
-- polls (default 20 ms; benchmarks poll finer).
function H.wait_until(fn, timeout, what, step)
  timeout = timeout or 10
  local deadline = H.now() + timeout
  while true do
    local v = fn()
    if v then return v end
    if H.now() > deadline then
      if type(what) == "function" then what = what() end
      error(string.format("timed out after %gs waiting for %s", timeout, what or "a condition"), 2)
    end
    H.sleep(step or 0.02)
  end
end

function H.write_file(path, content)
  local f = assert(io.open(path, "wb"))
  f:write(content)
  f:close()
end

function H.read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

-- Calls fn(...) expecting it to raise; returns the error.
function H.failure(fn, ...)
  local ok, err = pcall(fn, ...)
  assert(not ok, "expected an error")
  return err
end

-- A fresh database with bmdb.core opened on it (this process's session,
-- interval 2 s) and a plain admin connection: dsn, admin.
function H.open_core(component)
  local core = require "bmdb.core"
  local dsn = H.postgres():create_db()
  -- The events these specs provoke (lost sessions, failed items) are asserted
  -- on the database, not read from the log: keep busted's output readable.
  core.open { dsn = dsn, component = component, interval = 2, log_level = "error" }
  return dsn, core.connect(dsn)
end

function H.close_core(admin)
  require("bmdb.core").close()
  admin:close()
end

-- The events of machine m's history, oldest first, on connection conn.
function H.events(conn, m)
  local out = {}
  for _, r in ipairs(conn:query("SELECT event FROM work_history WHERE machine_id = $1 " ..
                                "ORDER BY occurred_at, history_id", m)) do
    out[#out + 1] = r.event
  end
  return out
end

-- Paths matching a shell pattern, sorted.
function H.glob(pattern)
  local out = {}
  local p = io.popen("ls -1d " .. pattern .. " 2>/dev/null")
  for line in p:lines() do out[#out + 1] = line end
  p:close()
  table.sort(out)
  return out
end

-- ---------------------------------------------------------------- cleanup

local tmpdirs, processes, servers = {}, {}, {}

function H.tmpdir(prefix)
  local buf = ffi.new("char[?]", 256)
  ffi.copy(buf, "/tmp/bmdb-" .. (prefix or "spec") .. "-XXXXXX")
  assert(C.mkdtemp(buf) ~= nil, "mkdtemp failed")
  local dir = ffi.string(buf)
  C.chmod(dir, tonumber("755", 8)) -- the unprivileged server user must get in
  tmpdirs[#tmpdirs + 1] = dir
  return dir
end

-- ---------------------------------------------------------------- processes

local Process = {}
Process.__index = Process

local function decode(status)
  local sig = bit.band(status, 0x7f)
  if sig == 0 then return bit.rshift(bit.band(status, 0xff00), 8) end
  return 128 + sig
end

function Process:running()
  if self.code then return false end
  local st = ffi.new("int[1]")
  local r = C.waitpid(self.pid, st, WNOHANG)
  if r == self.pid then
    self.code = decode(st[0])
    return false
  end
  return r == 0
end

function Process:kill(sig, group)
  if type(sig) == "string" then sig = assert(SIGNALS[sig], "unknown signal " .. sig) end
  if self.code then return end
  C.kill(group and -self.pid or self.pid, sig or 15)
end

function Process:wait(timeout)
  H.wait_until(function() return not self:running() end, timeout or 30,
    "process " .. self.pid .. " (" .. self.argv[1] .. ") to exit")
  return self.code
end

-- Waits until the process's stream ("stdout" or "stderr") contains text
-- (plain, not a pattern); on timeout the error carries the process's log.
function Process:await(stream, text, timeout)
  local ok, err = pcall(H.wait_until, function() return self[stream](self):find(text, 1, true) end,
    timeout or 20, string.format("%q on %s", text, stream))
  if not ok then
    error(err .. "\n--- stderr of " .. self.argv[#self.argv] .. ":\n" .. self:stderr(), 2)
  end
end

function Process:stdout() return H.read_file(self.out) or "" end
function Process:stderr() return H.read_file(self.err) or "" end
function Process:output() return self:stdout() .. self:stderr() end

local function cstrings(list)
  local arr = ffi.new("char *[?]", #list + 1)
  local keep = {}
  for i, s in ipairs(list) do
    keep[i] = ffi.new("char[?]", #s + 1, s)
    arr[i - 1] = keep[i]
  end
  arr[#list] = nil
  return arr, keep
end

local function environment(overrides)
  local env = {}
  local f = io.open("/proc/self/environ", "rb")
  local raw = f:read("*a")
  f:close()
  for kv in raw:gmatch("([^%z]+)") do
    local k = kv:match("^([^=]+)=")
    if k then env[k] = kv:sub(#k + 2) end
  end
  for k, v in pairs(overrides or {}) do
    if v == false then env[k] = nil else env[k] = tostring(v) end
  end
  local list = {}
  for k, v in pairs(env) do list[#list + 1] = k .. "=" .. v end
  return list
end

local function which(prog)
  if prog:find("/") then return prog end
  for dir in (os.getenv("PATH") or "/usr/bin:/bin"):gmatch("[^:]+") do
    local f = io.open(dir .. "/" .. prog)
    if f then
      f:close()
      return dir .. "/" .. prog
    end
  end
  return prog
end

-- A busy worker for the specs that load a host with short items: 2000
-- machines in a table spin, and dir/spin.lua, a worker of 8 slots that
-- claims them in random order and adds one to a machine's n per item.
-- Returns the script's path and the SQL that counts the items finished.
function H.spin_worker(admin, dir)
  admin:exec("CREATE TABLE spin (machine_id UUID PRIMARY KEY REFERENCES machines, n INT8 NOT NULL DEFAULT 0)")
  admin:exec("INSERT INTO machines SELECT gen_random_uuid() FROM generate_series(1, 2000)")
  admin:exec("INSERT INTO spin (machine_id) SELECT machine_id FROM machines")
  H.write_file(dir .. "/spin.lua", [[
    local bmdb = require "bmdb"
    return { bmdb.worker { process = "Spin", concurrency = 8, poll = 0.1,
      select = function(tx, limit)
        return tx:query([=[SELECT s.machine_id FROM spin s WHERE NOT EXISTS (SELECT 1 FROM work_blocked b
          WHERE b.machine_id = s.machine_id AND b.process = 'Spin') ORDER BY random() LIMIT $1]=], limit)
      end,
      run = function(w)
        w:finish(function(tx) tx:exec("UPDATE spin SET n = n + 1 WHERE machine_id = $1", w.machine) end)
      end } }
  ]])
  return dir .. "/spin.lua", "SELECT coalesce(sum(n), 0) AS n FROM spin"
end

-- spawn{argv=, env=, cwd=, stdin=, user={uid=, gid=}}: own process group,
-- stdout and stderr into files the spec can read while it runs.
function H.spawn(opts)
  local dir = H.tmpdir("proc")
  local out, err, inp = dir .. "/stdout", dir .. "/stderr", "/dev/null"
  if opts.stdin then
    inp = dir .. "/stdin"
    H.write_file(inp, opts.stdin)
  end
  -- Everything the child needs is prepared before fork: after it, the
  -- child only makes system calls.
  local argv, keep1 = cstrings(opts.argv)
  local envp, keep2 = cstrings(environment(opts.env))
  local prog = which(opts.argv[1])
  local cwd = opts.cwd
  local user = opts.user
  local msg = "spawn: exec failed: " .. prog .. "\n"
  local pid = C.fork()
  assert(pid >= 0, "fork failed")
  if pid == 0 then
    C.setpgid(0, 0)
    local i = C.open(inp, O_RDONLY, 0)
    local o = C.open(out, O_WRONLY + O_CREAT + O_TRUNC, 420)
    local e = C.open(err, O_WRONLY + O_CREAT + O_TRUNC, 420)
    C.dup2(i, 0); C.dup2(o, 1); C.dup2(e, 2)
    if cwd then C.chdir(cwd) end
    if user then
      if C.setgroups(0, nil) ~= 0 or C.setgid(user.gid) ~= 0 or C.setuid(user.uid) ~= 0 then C._exit(126) end
    end
    C.execve(prog, argv, envp)
    C.write(2, msg, #msg)
    C._exit(127)
  end
  local p = setmetatable({ pid = pid, argv = opts.argv, out = out, err = err, _keep = { keep1, keep2 } }, Process)
  processes[#processes + 1] = p
  return p
end

-- run(argv, {env=, cwd=, stdin=, timeout=}) -> code, stdout, stderr
function H.run(argv, opts)
  opts = opts or {}
  local p = H.spawn { argv = argv, env = opts.env, cwd = opts.cwd, stdin = opts.stdin, user = opts.user }
  local code = p:wait(opts.timeout or 60)
  return code, p:stdout(), p:stderr()
end

-- ---------------------------------------------------------------- postgres

local function pg_bindir()
  local env = os.getenv("BMDB_PG_BINDIR")
  if env and env ~= "" then return env end
  local f = io.popen("pg_config --bindir 2>/dev/null")
  local dir = f:read("*l")
  f:close()
  if dir and H.read_file(dir .. "/initdb") then return dir end
  f = io.popen("ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1")
  dir = f:read("*l")
  f:close()
  return assert(dir, "PostgreSQL server binaries not found (pg_config --bindir)")
end

-- As root the server must run as an unprivileged user.
local function server_user()
  if C.geteuid() ~= 0 then return nil end
  for line in io.lines("/etc/passwd") do
    local name, uid, gid = line:match("^([^:]+):[^:]*:(%d+):(%d+):")
    if name == "postgres" then return { uid = tonumber(uid), gid = tonumber(gid) } end
  end
  for line in io.lines("/etc/passwd") do
    local name, uid, gid = line:match("^([^:]+):[^:]*:(%d+):(%d+):")
    if name == "nobody" then return { uid = tonumber(uid), gid = tonumber(gid) } end
  end
  error("running as root and no postgres or nobody user to run the server")
end

-- The user a server (or its failover manager) runs as: nil when not root.
H.server_user = server_user
H.pg_bindir = pg_bindir

local Server = {}
Server.__index = Server

local function check(code, out, err, what)
  if code ~= 0 then error((what or "command") .. " failed (exit " .. code .. "): " .. err .. out, 3) end
  return out
end

function Server:start()
  check(H.run({ self.bindir .. "/pg_ctl", "-D", self.data, "-l", self.dir .. "/log", "-w", "-t", "60", "start" },
    { user = self.user, timeout = 90 }))
  self.up = true
end

function Server:stop(mode)
  if not self.up then return end
  H.run({ self.bindir .. "/pg_ctl", "-D", self.data, "-m", mode or "immediate", "-w", "stop" },
    { user = self.user, timeout = 90 })
  self.up = false
end

function Server:restart()
  self:stop("fast")
  self:start()
end

function Server:dsn(dbname)
  return "host=" .. self.dir .. " port=5432 dbname=" .. (dbname or "postgres") .. " user=bmdb"
end

function Server:psql(dsn, sql)
  local out = check(H.run({ "psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-c", sql }))
  return (out:gsub("%s+$", ""))
end

local db_counter = 0
function Server:create_db()
  db_counter = db_counter + 1
  local name = "t" .. db_counter .. "_" .. C.getpid()
  self:psql(self:dsn(), "CREATE DATABASE " .. name)
  return self:dsn(name)
end

local function start_server()
  local dir = H.tmpdir("pg")
  local user = server_user()
  local s = setmetatable({ dir = dir, data = dir .. "/data", bindir = pg_bindir(), user = user }, Server)
  if user then
    check(H.run({ "chown", user.uid .. ":" .. user.gid, dir }))
  end
  local code, out, err = H.run({ s.bindir .. "/initdb", "-D", s.data, "-U", "bmdb", "--auth=trust", "--no-sync" },
    { user = user, timeout = 120 })
  check(code, out, err, "initdb")
  local conf = H.read_file(s.data .. "/postgresql.conf")
  H.write_file(s.data .. "/postgresql.conf", conf .. table.concat({
    "", "listen_addresses = ''", "unix_socket_directories = '" .. dir .. "'",
    "fsync = off", "synchronous_commit = off", "full_page_writes = off",
    "max_connections = 300", "" }, "\n"))
  s:start()
  servers[#servers + 1] = s
  return s
end

-- pg_ctl promote: a standby becomes a primary that accepts writes.
function Server:promote()
  check(H.run({ self.bindir .. "/pg_ctl", "-D", self.data, "-w", "-t", "60", "promote" },
    { user = self.user, timeout = 90 }))
end

local function append_conf(s, lines)
  local conf = H.read_file(s.data .. "/postgresql.conf")
  H.write_file(s.data .. "/postgresql.conf", conf .. "\n" .. table.concat(lines, "\n") .. "\n")
end

-- A primary and a streaming hot standby made with pg_basebackup -R, each
-- on its own Unix socket in its own temp dir. With sync = true the standby
-- is synchronous and commits wait for it (synchronous_commit = on), so a
-- commit the primary acknowledged is on the standby too. Returns primary,
-- standby once the standby streams (and is the synchronous one).
function H.standby_pair(opts)
  opts = opts or {}
  local primary = start_server()
  append_conf(primary, { "wal_level = replica", "max_wal_senders = 5", "hot_standby = on",
    "synchronous_commit = " .. (opts.sync and "on" or "off"),
    "synchronous_standby_names = '" .. (opts.sync and "*" or "") .. "'" })
  primary:restart()
  local dir = H.tmpdir("pg")
  local user = primary.user
  local standby = setmetatable({ dir = dir, data = dir .. "/data", bindir = primary.bindir, user = user }, Server)
  if user then check(H.run({ "chown", user.uid .. ":" .. user.gid, dir })) end
  local code, out, err = H.run({ primary.bindir .. "/pg_basebackup", "-h", primary.dir, "-p", "5432", "-U", "bmdb",
    "-D", standby.data, "-R", "-X", "stream", "--no-sync" }, { user = user, timeout = 120 })
  check(code, out, err, "pg_basebackup")
  -- the copied configuration names the primary's socket and sync standby
  append_conf(standby, { "unix_socket_directories = '" .. dir .. "'", "synchronous_standby_names = ''" })
  standby:start()
  servers[#servers + 1] = standby
  H.wait_until(function()
    local state = primary:psql(primary:dsn(), "SELECT string_agg(state || '/' || sync_state, ',') FROM pg_stat_replication")
    return state == (opts.sync and "streaming/sync" or "streaming/async")
  end, 60, "the standby to stream from the primary")
  return primary, standby
end

-- A libpq DSN naming every server in order; libpq connects to the first
-- that accepts writes.
function H.multi_dsn(list, dbname)
  local hosts, ports = {}, {}
  for i, s in ipairs(list) do hosts[i], ports[i] = s.dir, "5432" end
  return "host=" .. table.concat(hosts, ",") .. " port=" .. table.concat(ports, ",") ..
    " dbname=" .. dbname .. " user=bmdb target_session_attrs=read-write"
end

local shared
-- The server every spec file shares; each spec makes its own database.
function H.postgres(opts)
  if opts and opts.fresh then return start_server() end
  if not shared then shared = start_server() end
  return shared
end

-- ---------------------------------------------------------------- faults

-- Signals any process by pid (a PostgreSQL backend, a host's thread group).
function H.signal(pid, sig)
  if type(sig) == "string" then sig = assert(SIGNALS[sig], "unknown signal " .. sig) end
  return C.kill(pid, sig) == 0
end

-- The server processes serving connections whose application_name is
-- `app` (hosts set it in their DSN): { {pid=, state=, query=}, ... }.
function H.backends(conn, app)
  return conn:query([[SELECT pid, state, query, wait_event_type FROM pg_stat_activity
                      WHERE application_name = $1 AND pid <> pg_backend_pid() ORDER BY pid]], app)
end

-- pg_terminate_backend: the server closes that connection.
function H.terminate_backend(conn, pid)
  return conn:one("SELECT pg_terminate_backend($1) AS ok", pid).ok
end

-- Lua source, for the worker scripts specs write, of a local
-- wait_for(what, ok): polls ok() every 10 ms (bmdb.sleep, so a canceled
-- item stops) and raises after 20 s. The script must have `bmdb` in scope.
H.script_wait_for = [[
  local function wait_for(what, ok)
    local deadline = require("bmdb.core").now() + 20
    while not ok() do
      if require("bmdb.core").now() > deadline then error("gave up waiting for " .. what) end
      bmdb.sleep(0.01)
    end
  end
]]

-- A relay (support/relay.lua) between a client and the test server, for
-- dsn, a DSN on that server: { dsn = the same DSN through the relay,
-- dir = its directory (where it writes `fired`), proc = its process,
-- freeze(), thaw() }. args: the relay's SKIP, MEMBERS and mode, as
-- strings; without them it loses no answer. freeze() (SIGSTOP) hangs
-- every connection through it, and every new one, like a route that
-- black-holes; thaw() undoes it.
function H.relay(dsn, args)
  local dir = H.tmpdir("relay")
  local argv = { "luajit", H.root .. "/spec/support/relay.lua", dir, H.postgres().dir }
  for _, a in ipairs(args or { "0", "0", "none" }) do argv[#argv + 1] = a end
  local r = { dir = dir, proc = H.spawn { argv = argv }, dsn = (dsn:gsub("host=%S+", "host=" .. dir)) }
  function r.freeze() return H.signal(r.proc.pid, "STOP") end
  function r.thaw() return H.signal(r.proc.pid, "CONT") end
  local core = require "bmdb.core"
  H.wait_until(function()
    local ok, c = pcall(core.connect, r.dsn)
    if ok then c:close() end
    return ok
  end, 20, "the relay")
  return r
end

-- Resident set size in kB, and open file descriptors, of a live process.
function H.rss_kb(pid)
  local status = H.read_file("/proc/" .. pid .. "/status") or ""
  return tonumber(status:match("VmRSS:%s*(%d+)"))
end

function H.fd_count(pid)
  local p = io.popen("ls -1 /proc/" .. pid .. "/fd 2>/dev/null")
  local n = 0
  for _ in p:lines() do n = n + 1 end
  p:close()
  return n
end

function H.cleanup()
  for _, p in ipairs(processes) do
    if p:running() then
      p:kill("KILL", true)
      p:wait(10)
    end
  end
  processes = {}
  for _, s in ipairs(servers) do s:stop("immediate") end
  servers, shared = {}, nil
  if #tmpdirs > 0 then
    local dirs = tmpdirs
    tmpdirs = {}
    os.execute("rm -rf " .. table.concat(dirs, " "))
  end
end

-- busted runs every file in one process; clean up when the run ends. (Not
-- in a __gc at exit: by then the FFI types this needs may be gone.)
local ok, busted = pcall(require, "busted")
if ok and type(busted) == "table" and busted.subscribe then
  busted.subscribe({ "exit" }, function()
    H.cleanup()
    return nil, true
  end)
end

return H
