-- support/patroni.lua -- a real Patroni cluster for the fault specs: one
-- etcd on localhost and two PostgreSQL nodes managed by Patroni in
-- synchronous mode, each on its own TCP port, run as the unprivileged
-- server user (helpers.lua: H.server_user). Needs Debian's patroni and
-- etcd-server (the Makefile's deps install them).
local H = require "support.helpers"

local P = {}

-- Patroni's timing, which the spec's --interval is chosen against
-- (README, "Running in production").
P.ttl, P.loop_wait, P.retry_timeout = 10, 1, 3

function P.available()
  return os.execute("command -v patroni >/dev/null 2>&1 && command -v etcd >/dev/null 2>&1") == 0
end

local Cluster = {}
Cluster.__index = Cluster

local function chown(user, path)
  if user then assert(os.execute(("chown -R %d:%d %q"):format(user.uid, user.gid, path)) == 0) end
end

local function node_conf(c, i)
  local n = c.nodes[i]
  return table.concat({
    "scope: " .. c.scope,
    "name: " .. n.name,
    "restapi:",
    "  listen: 127.0.0.1:" .. n.api,
    "  connect_address: 127.0.0.1:" .. n.api,
    "etcd3:",
    "  hosts: 127.0.0.1:" .. c.etcd_port,
    "bootstrap:",
    "  dcs:",
    "    ttl: " .. P.ttl,
    "    loop_wait: " .. P.loop_wait,
    "    retry_timeout: " .. P.retry_timeout,
    "    synchronous_mode: true",
    "    postgresql:",
    "      use_pg_rewind: false",
    "      parameters:",
    "        synchronous_commit: 'on'",
    "        fsync: 'off'",
    "        max_connections: 100",
    "        wal_level: replica",
    "        hot_standby: 'on'",
    "        max_wal_senders: 5",
    "        max_replication_slots: 5",
    "  initdb:",
    "    - encoding: UTF8",
    "    - username: bmdb",
    "    - auth: trust",
    "  pg_hba:",
    "    - local all all trust",
    "    - host all all 127.0.0.1/32 trust",
    "    - local replication all trust",
    "    - host replication all 127.0.0.1/32 trust",
    "postgresql:",
    "  listen: 127.0.0.1:" .. n.port,
    "  connect_address: 127.0.0.1:" .. n.port,
    "  data_dir: " .. n.dir .. "/data",
    "  bin_dir: " .. H.pg_bindir(),
    "  pgpass: " .. n.dir .. "/pgpass",
    "  authentication:",
    "    superuser:",
    "      username: bmdb",
    "    replication:",
    "      username: bmdb",
    "  parameters:",
    "    unix_socket_directories: '" .. n.dir .. "'",
    "",
  }, "\n")
end

-- A running cluster, its first node the leader and the second its
-- synchronous standby. Ports: a block of eight from a base chosen by pid.
function P.cluster()
  local pid = tonumber(io.open("/proc/self/stat"):read("*n"))
  local base = 21000 + (pid % 2500) * 8
  local c = setmetatable({ dir = H.tmpdir("patroni"), scope = "bmdb" .. pid, etcd_port = base,
    user = H.server_user(), nodes = {} }, Cluster)
  for i = 1, 2 do
    local n = { name = "n" .. i, port = base + 1 + i, api = base + 3 + i }
    n.dir = c.dir .. "/" .. n.name
    assert(os.execute(("mkdir -p %q"):format(n.dir)) == 0)
    c.nodes[i] = n
    H.write_file(n.dir .. "/patroni.yml", node_conf(c, i))
  end
  chown(c.user, c.dir)
  c.etcd = H.spawn { argv = { "etcd", "--name", "e1", "--data-dir", c.dir .. "/etcd",
    "--listen-client-urls", "http://127.0.0.1:" .. base, "--advertise-client-urls", "http://127.0.0.1:" .. base,
    "--listen-peer-urls", "http://127.0.0.1:" .. (base + 1),
    "--initial-advertise-peer-urls", "http://127.0.0.1:" .. (base + 1),
    "--initial-cluster", "e1=http://127.0.0.1:" .. (base + 1) }, user = c.user, env = { HOME = c.dir } }
  H.wait_until(function() return c:http("GET", "127.0.0.1:" .. base .. "/health") == 200 end, 60, "etcd to start")
  c:start(1)
  c:await_role(1, "primary", 90)
  c:start(2)
  c:await_sync(90)
  return c
end

-- curl: the status code (0 when nothing answered) and the body.
function Cluster:http(method, where, body)
  local cmd = ("curl -s -m 30 -o - -w '\\n%%{http_code}' -X %s %s http://%s"):format(method,
    body and ("-d '" .. body .. "'") or "", where)
  local f = io.popen(cmd)
  local out = f:read("*a")
  f:close()
  local text, code = out:match("^(.*)\n(%d+)$")
  return tonumber(code) or 0, text or out
end

function Cluster:api(i, method, path, body)
  return self:http(method, "127.0.0.1:" .. self.nodes[i].api .. path, body)
end

function Cluster:start(i)
  local n = self.nodes[i]
  n.proc = H.spawn { argv = { "patroni", n.dir .. "/patroni.yml" }, user = self.user, env = { HOME = n.dir } }
end

-- The node answering 200 on /primary or /replica.
function Cluster:await_role(i, role, timeout)
  H.wait_until(function() return self:api(i, "GET", "/" .. role) == 200 end, timeout or 60,
    self.nodes[i].name .. " to be " .. role .. "\n" .. self:log(i))
end

-- The index of the leader, or nil.
function Cluster:leader()
  for i = 1, #self.nodes do
    if self:api(i, "GET", "/primary") == 200 then return i end
  end
end

-- Until the cluster has a leader and a streaming synchronous standby.
function Cluster:await_sync(timeout)
  H.wait_until(function()
    local l = self:leader()
    if not l then return false end
    local code, body = self:api(l, "GET", "/cluster")
    return code == 200 and body:find('"role": *"sync_standby"') ~= nil and self:api(3 - l, "GET", "/sync") == 200
  end, timeout or 90, "a leader and a synchronous standby\n" .. self:log(1) .. self:log(2))
end

function Cluster:postmaster(i)
  local f = io.open(self.nodes[i].dir .. "/data/postmaster.pid")
  if not f then return nil end
  local pid = f:read("*n")
  f:close()
  return pid
end

-- kill -9 of a node's Patroni and its postmaster (its backends follow).
function Cluster:kill_node(i)
  local pm = self:postmaster(i)
  self.nodes[i].proc:kill("KILL")
  if pm then os.execute("kill -9 " .. pm .. " 2>/dev/null") end
  self.nodes[i].proc:wait(30)
  self.nodes[i].dead = true
end

function Cluster:log(i)
  local n = self.nodes[i]
  return "--- patroni " .. n.name .. ":\n" .. (n.proc and n.proc:output():sub(-2000) or "")
end

-- A libpq DSN listing both nodes; libpq takes the first that accepts writes.
function Cluster:dsn(dbname)
  return ("host=127.0.0.1,127.0.0.1 port=%d,%d dbname=%s user=bmdb target_session_attrs=read-write"):format(
    self.nodes[1].port, self.nodes[2].port, dbname)
end

function Cluster:stop()
  for i, n in ipairs(self.nodes) do
    if n.proc and n.proc:running() then
      n.proc:kill("TERM")
      pcall(n.proc.wait, n.proc, 60)
    end
    local pm = self:postmaster(i)
    if pm then os.execute("kill -9 " .. pm .. " 2>/dev/null") end
  end
  if self.etcd then
    self.etcd:kill("TERM")
    pcall(self.etcd.wait, self.etcd, 30)
  end
end

return P
