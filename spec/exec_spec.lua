-- bmdb.exec: commands run as a body's I/O, in a process group of their
-- own, fenced by the item's lock, the session and the host's cancel. Real
-- processes, signals and files; the fenced calls in real hosts on a real
-- PostgreSQL.
local H = require "support.helpers"
local http = require "support.http"
local bmdb = require "bmdb"
local ffi = require "ffi"

ffi.cdef [[
int setenv(const char *name, const char *value, int overwrite);
int unsetenv(const char *name);
typedef struct { unsigned long val[16]; } exec_spec_sigset;
int sigprocmask(int how, const exec_spec_sigset *set, exec_spec_sigset *old);
typedef void (*exec_spec_handler)(int);
exec_spec_handler signal(int sig, exec_spec_handler handler);
]]

-- Dead: no /proc entry, or a zombie (killed, waiting for its reaper).
local function dead(pid)
  local stat = H.read_file("/proc/" .. pid .. "/stat")
  return stat == nil or stat:match("^%d+ %b() (%a)") == "Z"
end

local function failure(opts)
  local ok, err = pcall(bmdb.exec, opts)
  assert(not ok, "expected bmdb.exec to raise")
  return err
end

local function esc(text) return (text:gsub("%p", "%%%0")) end

describe("bmdb.exec", function()
  local dir

  setup(function() dir = H.tmpdir("exec") end)

  it("returns stdout, stderr and the exit status; a non-zero exit is a result", function()
    local r = bmdb.exec { argv = { "sh", "-c", "printf 'out\\n'; printf 'err' >&2; exit 3" } }
    assert.same({ status = 3, stdout = "out\n", stderr = "err" }, r)
    r = bmdb.exec { argv = { "sh", "-c", "kill -KILL $$" } }
    assert.same({ signal = "KILL", stdout = "", stderr = "" }, r)
    r = bmdb.exec { argv = { "sh", "-c", "kill -TERM $$" } }
    assert.same({ signal = "TERM", stdout = "", stderr = "" }, r)
  end)

  it("feeds stdin as the pipe takes it while it reads stdout: 1 MiB through cat", function()
    local parts = {}
    for i = 0, 1024 * 1024 - 1, 256 do parts[#parts + 1] = string.char(i / 256 % 256) .. ("\0x"):rep(127) .. "\n" end
    local input = table.concat(parts)
    assert.equal(1024 * 1024, #input)
    local r = bmdb.exec { argv = { "cat" }, stdin = input, timeout = 60 }
    assert.equal(0, r.status)
    assert.is_true(r.stdout == input, "cat gave back other bytes")
    -- no stdin: /dev/null; an empty one: EOF at once
    assert.equal("0\n", bmdb.exec { argv = { "sh", "-c", "wc -c | tr -d ' '" } }.stdout)
    assert.equal("0\n", bmdb.exec { argv = { "sh", "-c", "wc -c | tr -d ' '" }, stdin = "" }.stdout)
    -- a command that reads none of it: the write meets a closed pipe, and
    -- the SIGPIPE that raises does not kill the caller (this process does
    -- not block it)
    r = bmdb.exec { argv = { "true" }, stdin = input .. input }
    assert.equal(0, r.status)
  end)

  it("merges env over the host's environment, false removes a name; the host's credentials stay its own", function()
    local saved = { BMDB_DSN = os.getenv("BMDB_DSN"), PGPASSWORD = os.getenv("PGPASSWORD") }
    ffi.C.setenv("BMDB_DSN", "postgresql://secret@db/x", 1)
    ffi.C.setenv("PGPASSWORD", "hunter2", 1)
    ffi.C.setenv("BMDB_EXEC_SPEC_A", "from the host", 1)
    ffi.C.setenv("BMDB_EXEC_SPEC_B", "from the host", 1)
    local ok, err = pcall(function()
      local show = { "sh", "-c", 'for n in BMDB_EXEC_SPEC_A BMDB_EXEC_SPEC_B BMDB_EXEC_SPEC_C BMDB_DSN PGPASSWORD; do ' ..
                                 'eval "printf \'%s=%s;\' $n \\"\\${$n-unset}\\""; done' }
      assert.equal("BMDB_EXEC_SPEC_A=from the host;BMDB_EXEC_SPEC_B=from the host;BMDB_EXEC_SPEC_C=unset;" ..
                   "BMDB_DSN=unset;PGPASSWORD=unset;", bmdb.exec { argv = show }.stdout)
      assert.equal("BMDB_EXEC_SPEC_A=mine;BMDB_EXEC_SPEC_B=unset;BMDB_EXEC_SPEC_C=new;" ..
                   "BMDB_DSN=given;PGPASSWORD=unset;", bmdb.exec { argv = show, env = {
                     BMDB_EXEC_SPEC_A = "mine", BMDB_EXEC_SPEC_B = false, BMDB_EXEC_SPEC_C = "new", BMDB_DSN = "given",
                   } }.stdout)
      -- each name once
      local env = bmdb.exec { argv = { "env" }, env = { BMDB_EXEC_SPEC_A = "mine" } }.stdout
      local _, n = env:gsub("\nBMDB_EXEC_SPEC_A=", "")
      assert.equal(1, n + (env:match("^BMDB_EXEC_SPEC_A=") and 1 or 0))
    end)
    for k, v in pairs(saved) do
      if v then ffi.C.setenv(k, v, 1) else ffi.C.unsetenv(k) end
    end
    ffi.C.unsetenv("BMDB_EXEC_SPEC_A")
    ffi.C.unsetenv("BMDB_EXEC_SPEC_B")
    assert(ok, err)
  end)

  it("runs in cwd, and looks argv[1] up in the PATH the command gets", function()
    local bin = dir .. "/bin"
    assert.equal(0, bmdb.exec { argv = { "mkdir", "-p", bin .. "/sub" } }.status)
    H.write_file(bin .. "/bmdb-exec-hello", "#!/bin/sh\necho hello from \"$(pwd -P)\"\n")
    H.write_file(bin .. "/bmdb-exec-noexec", "#!/bin/sh\necho never\n")
    assert.equal(0, bmdb.exec { argv = { "chmod", "755", bin .. "/bmdb-exec-hello" } }.status)
    local real = bmdb.exec { argv = { "pwd", "-P" }, cwd = bin .. "/sub" }.stdout
    assert.equal(bin .. "/sub\n", real)
    local path = bin .. ":" .. (os.getenv("PATH") or "/usr/bin:/bin")
    local r = bmdb.exec { argv = { "bmdb-exec-hello" }, env = { PATH = path }, cwd = bin .. "/sub" }
    assert.equal("hello from " .. real, r.stdout)
    -- a path with a slash is not looked up, and is relative to cwd
    assert.equal("hello from " .. real, bmdb.exec { argv = { "../bmdb-exec-hello" }, cwd = bin .. "/sub" }.stdout)
    -- not in the host's PATH: only in the one given
    local err = failure { argv = { "bmdb-exec-hello" } }
    assert.same({ "exec", "spawn", "bmdb-exec-hello" }, { err.kind, err.reason, err.command })
    assert.matches("No such file or directory", err.message)
    -- found but not executable, and nothing else of that name: EACCES, as execvp
    err = failure { argv = { "bmdb-exec-noexec" }, env = { PATH = path } }
    assert.same({ "exec", "spawn" }, { err.kind, err.reason })
    assert.matches("Permission denied", err.message)
  end)

  it("raises kind exec, reason spawn, with the errno text when the command cannot start", function()
    local err = failure { argv = { "bmdb-no-such-command" } }
    assert.same({ "exec", "spawn", "bmdb-no-such-command", "No such file or directory" },
                { err.kind, err.reason, err.command, err.error })
    assert.equal("exec bmdb-no-such-command: cannot start it: No such file or directory", err.message)
    H.write_file(dir .. "/plain", "not a program\n")
    err = failure { argv = { dir .. "/plain" } }
    assert.same({ "exec", "spawn", "Permission denied" }, { err.kind, err.reason, err.error })
    err = failure { argv = { "ls" }, cwd = dir .. "/no-such-dir" }
    assert.same({ "exec", "spawn" }, { err.kind, err.reason })
    assert.equal("exec ls: cannot start it in cwd '" .. dir .. "/no-such-dir': No such file or directory", err.message)
  end)

  it("raises usage naming the option that is wrong, at the caller's line", function()
    local cases = {
      { nil, "table expected, got nil" },
      { {}, "argv: a list of strings expected, got nil" },
      { { argv = "ls" }, "argv: a list of strings expected, got string" },
      { { argv = {} }, "argv is empty" },
      { { argv = { "" } }, "argv[1] is empty" },
      { { argv = { "ls", 1 } }, "argv[2]: string expected, got number" },
      { { argv = { "l\0s" } }, "argv[1] contains a NUL byte" },
      { { argv = { "ls", "-l\0" } }, "argv[2] contains a NUL byte" },
      { { argv = { "ls" }, env = "A=B" }, "env: table expected, got string" },
      { { argv = { "ls" }, env = { A = "x\0y" } }, "env.A contains a NUL byte" },
      { { argv = { "ls" }, env = { ["A=B"] = "x" } }, "env: invalid name 'A=B'" },
      { { argv = { "ls" }, env = { A = true } }, "env.A: string or false expected, got boolean" },
      { { argv = { "ls" }, env = { "x" } }, "env: names must be strings, got number" },
      { { argv = { "ls" }, timeout = -1 }, "timeout: expected a number > 0, got -1" },
      { { argv = { "ls" }, timeout = 0 }, "timeout: expected a number > 0, got 0" },
      { { argv = { "ls" }, timeout = 0 / 0 }, "timeout: expected a number > 0, got nan" },
      { { argv = { "ls" }, timeout = "5" }, "timeout: expected a number > 0, got string" },
      { { argv = { "ls" }, grace = -1 }, "grace: expected a number from 0 to 86400, got -1" },
      { { argv = { "ls" }, max_output = 1.5 }, "max_output: expected a whole number of bytes" },
      { { argv = { "ls" }, max_output = -1 }, "max_output: expected a number from 0 to" },
      { { argv = { "ls" }, stdin = 5 }, "stdin: string expected, got number" },
      { { argv = { "ls" }, cwd = "" }, "cwd is empty" },
      { { argv = { "ls" }, cwd = "/t\0mp" }, "cwd contains a NUL byte" },
      { { argv = { "ls" }, tiemout = 3 }, "unknown option 'tiemout'" },
    }
    for _, c in ipairs(cases) do
      local ok, err = pcall(function() bmdb.exec(c[1]) end) local line = debug.getinfo(1, "l").currentline
      assert.is_false(ok)
      assert.equal("usage", err.kind, tostring(err))
      assert.matches("exec_spec%.lua:" .. line .. ": bad argument #1 to 'exec' %(" .. esc(c[2]), err.message)
    end
  end)

  it("keeps max_output bytes of a stream; past it, ends the group and raises reason too_large", function()
    local r = bmdb.exec { argv = { "head", "-c", "1000", "/dev/zero" }, max_output = 1000 }
    assert.equal(1000, #r.stdout)
    local err = failure { argv = { "head", "-c", "1001", "/dev/zero" }, max_output = 1000 }
    assert.same({ "exec", "too_large", "stdout" }, { err.kind, err.reason, err.stream })
    -- endless output: without the limit this would never return
    err = failure { argv = { "sh", "-c", "yes >&2" }, max_output = 64 * 1024, timeout = 30 }
    assert.same({ "exec", "too_large", "stderr" }, { err.kind, err.reason, err.stream })
  end)

  it("ends its group on its own timeout: SIGTERM first; the error has the output so far", function()
    local ok, err = pcall(bmdb.exec, { argv = { "sh", "-c", 'trap "echo got TERM; exit 0" TERM; echo started; ' ..
                                                             'sleep 60 & wait' }, timeout = 1 })
    assert.is_false(ok)
    assert.same({ "exec", "timeout", "sh", "started\ngot TERM\n", "" },
                { err.kind, err.reason, err.command, err.stdout, err.stderr })
    assert.equal("exec sh: timed out after 1s; its process group was terminated", err.message)
  end)

  it("gives the command an empty signal mask and default dispositions, whatever the caller's", function()
    local SIG_BLOCK, SIG_SETMASK, SIGUSR1, SIGUSR2 = 0, 2, 10, 12
    local set, old = ffi.new("exec_spec_sigset"), ffi.new("exec_spec_sigset")
    set.val[0] = bit.lshift(1, SIGUSR1 - 1)
    ffi.C.sigprocmask(SIG_BLOCK, set, old)
    local prev = ffi.C.signal(SIGUSR2, ffi.cast("exec_spec_handler", 1)) -- SIG_IGN
    local ok, r = pcall(bmdb.exec, { argv = { "grep", "-E", "^Sig(Blk|Ign):", "/proc/self/status" } })
    ffi.C.signal(SIGUSR2, prev)
    ffi.C.sigprocmask(SIG_SETMASK, old, nil)
    assert(ok, r)
    local blocked, ignored = r.stdout:match("^SigBlk:\t(%x+)\nSigIgn:\t(%x+)\n$")
    assert.equal("0000000000000000", blocked)
    -- but for signals 32 and 33, glibc's own, which no glibc call can reset
    local hi, lo = tonumber(ignored:sub(1, 8), 16), tonumber(ignored:sub(9, 16), 16)
    assert.same({ 0, 0 }, { hi - hi % 2, lo % 0x80000000 }, "ignored: " .. ignored)
  end)

  it("kills what the command left running in its group when it exits", function()
    -- the background sleep holds stdout: the call returns only once it is gone
    local r = bmdb.exec { argv = { "sh", "-c", "sleep 60 & echo $!" }, timeout = 30 }
    assert.equal(0, r.status)
    local pid = assert(r.stdout:match("^(%d+)\n$"))
    H.wait_until(function() return dead(pid) end, 10, "the background sleep to be killed")
  end)

  it("waits for its output until its deadline when a process outside its group holds it", function()
    -- the shell exits once the sleep is in a session of its own
    local file = dir .. "/escaped"
    local ok, err = pcall(bmdb.exec, { argv = { "sh", "-c", [[
      setsid sh -c 'echo $$ > "$0.tmp"; mv "$0.tmp" "$0"; exec sleep 60' "$0" &
      while [ ! -s "$0" ]; do sleep 0.01; done]], file }, timeout = 1 })
    local pid = (H.read_file(file) or ""):match("^(%d+)\n$")
    if pid then ffi.C.kill(tonumber(pid), 9) end
    assert.is_false(ok)
    assert.same({ "exec", "timeout", "sh" }, { err.kind, err.reason, err.command })
    assert.matches("it exited, but something outside its process group kept its output open", err.message)
    assert.is_truthy(pid)
  end)

  describe("in a host", function()
    local dsn, admin

    setup(function()
      dsn, admin = H.open_core("exec_spec")
      admin:exec("CREATE TABLE wanted (machine_id UUID PRIMARY KEY, process TEXT NOT NULL, role TEXT NOT NULL)")
      admin:exec("CREATE TABLE done (machine_id UUID PRIMARY KEY)")
    end)

    teardown(function() H.close_core(admin) end)

    local function new_item(process, role)
      local m = admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
      admin:exec("INSERT INTO wanted VALUES ($1, $2, $3)", m, process, role)
      return m
    end

    local function is_done(m) return admin:one("SELECT 1 AS x FROM done WHERE machine_id = $1", m) ~= nil end

    local function lines(path)
      local out = {}
      for l in (H.read_file(path) or ""):gmatch("[^\n]+") do out[#out + 1] = l end
      return out
    end

    -- One worker; each item's role says what its body does. Files go to
    -- DIR: the sleeper's pid, each body's outcome. An item runs its role
    -- once; run again (after a cancel) it only finishes.
    --
    -- A lock taken away also interrupts the body with a hook (docs/work-control.md:
    -- timeouts, cancel), which raises once, at the body's next instruction:
    -- right after the call that raised, or a little later. So a body
    -- records its outcome as a file of that name, made even when the hook
    -- strikes between open and close, and tried again when it strikes
    -- before. That the call itself raised is shown by bmdb_exec_total.
    local worker = [[
      local bmdb = require "bmdb"
      local dir = os.getenv("DIR")
      local function append(name, line)
        local f = assert(io.open(dir .. "/" .. name, "a"))
        f:write(line, "\n")
        f:close()
      end
      local function kind(err) return bmdb.is_error(err) and err.kind or tostring(err) end
      local function record(err)
        for _ = 1, 3 do
          if pcall(function() assert(io.open(dir .. "/outcome-" .. kind(err), "w")):close() end) then return end
        end
      end
      local function finish(w) w:finish(function(tx) tx:exec("INSERT INTO done VALUES ($1)", w.machine) end) end
      local function echo_x() return pcall(bmdb.exec, { argv = { "sh", "-c", 'echo x >> "$0"', dir .. "/appends" } }) end
      local roles = {
        -- the shell writes its pid, then becomes the sleep (same pid)
        sleep = function(w)
          local _, err = pcall(function()
            local ok, e = pcall(bmdb.exec, { argv = { "sh", "-c", 'echo $$ > "$0.tmp"; mv "$0.tmp" "$0"; exec sleep 30',
                                                      dir .. "/pid" } })
            error(ok and "returned" or e, 0)
          end)
          record(err)
          error(err, 0)
        end,
        quick = function(w)
          record("quick-" .. bmdb.exec({ argv = { "true" } }).status)
          finish(w)
        end,
        -- runs the command until the lock is lost (its call raises, or
        -- the hook does, inside the pcall either way), records that, then
        -- tries again: no call may start now
        loop = function(w)
          local _, err = pcall(function()
            while true do
              local ok, e = echo_x()
              if not ok then error(e, 0) end
            end
          end)
          append("appends", "LOST " .. kind(err))
          for _ = 1, 5 do
            local ok, e = echo_x()
            append("appends", "again " .. (ok and "ran" or kind(e)))
          end
        end,
      }
      local process = os.getenv("PROCESS")
      return bmdb.worker {
        process = process, poll = 0.2, timeout = tonumber(os.getenv("TIMEOUT")), backoff = { initial = 60 },
        select = function(tx, limit)
          return tx:query([=[SELECT machine_id FROM wanted w WHERE process = $2
            AND NOT EXISTS (SELECT 1 FROM done d WHERE d.machine_id = w.machine_id)
            AND NOT EXISTS (SELECT 1 FROM work_blocked b WHERE b.machine_id = w.machine_id AND b.process = $2)
            LIMIT $1]=], limit, process)
        end,
        run = function(w)
          local role = bmdb.transact(function(tx)
            return tx:one("SELECT role FROM wanted WHERE machine_id = $1", w.machine).role
          end)
          local marker = dir .. "/" .. w.machine .. ".ran"
          if io.open(marker) then return finish(w) end
          io.open(marker, "w"):close()
          roles[role](w)
        end,
      }
    ]]

    local function start(process, opts)
      local d = H.tmpdir("exec-" .. process)
      H.write_file(d .. "/worker.lua", worker)
      local argv = { H.bin, "--interval", "2", "--http", "127.0.0.1:0" }
      for _, a in ipairs(opts.args or {}) do argv[#argv + 1] = a end
      argv[#argv + 1] = d .. "/worker.lua"
      local h = H.spawn { argv = argv, env = { BMDB_DSN = dsn, DIR = d, PROCESS = process, TIMEOUT = opts.timeout } }
      return h, d
    end

    local function sleeper_pid(h, d)
      return H.wait_until(function() return (H.read_file(d .. "/pid") or ""):match("^(%d+)\n$") end, 30,
        function() return "the sleeper's pid\n" .. h:stderr() end)
    end

    local function metric(h, pattern)
      local port = tonumber(h:stderr():match("http listening.-address=127%.0%.0%.1:(%d+)"))
      local status, why, body = http.get(port, "/metrics")
      assert.equal(200, status, why)
      return body:match(pattern), body
    end

    local function outcomes(d)
      local out = {}
      for _, p in ipairs(H.glob(d .. "/outcome-*")) do out[#out + 1] = p:match("outcome%-(.*)$") end
      return out
    end

    -- The body's call ended with kind (counted so: the call raised it),
    -- the sleep is gone, and the slot is free for the next item.
    local function assert_ended(h, d, process, pid, kind)
      H.wait_until(function() return dead(pid) end, 10, "the sleep to be gone")
      H.wait_until(function() return outcomes(d)[1] end, 10,
        function() return "the body's outcome\n" .. h:stderr() end)
      assert.same({ kind }, outcomes(d))
      local n = H.wait_until(function()
        return metric(h, '\nbmdb_exec_total{command="sh",outcome="' .. kind .. '"} (%d+)\n')
      end, 10, "the call counted")
      assert.equal("1", n)
      assert.equal("1", (metric(h, '\nbmdb_exec_seconds_count{command="sh"} (%d+)\n')))
      local next = new_item(process, "quick")
      H.wait_until(function() return is_done(next) end, 20,
        function() return "the slot to run the next item\n" .. h:stderr() end)
      assert.same({ kind, "quick-0" }, outcomes(d))
      assert.equal("1", (metric(h, '\nbmdb_exec_total{command="true",outcome="exited"} (%d+)\n')))
      h:kill("TERM")
      assert.equal(0, h:wait(30), h:stderr())
      assert.not_matches("slot stuck", h:stderr())
    end

    it("ends a body's command when the item's timeout passes: the call raises lost", function()
      local process = "ExecTimeout"
      new_item(process, "sleep")
      local h, d = start(process, { timeout = "1" })
      assert_ended(h, d, process, sleeper_pid(h, d), "lost")
    end)

    it("ends a body's command when an operator cancels its lock: the call raises lost", function()
      local process = "ExecCancel"
      local m = new_item(process, "sleep")
      local h, d = start(process, {})
      local pid = sleeper_pid(h, d)
      local code, out, err = H.run({ H.bin, "cancel", m, process }, { env = { BMDB_DSN = dsn } })
      assert.equal(0, code, out .. err)
      assert_ended(h, d, process, pid, "lost")
    end)

    it("ends a body's command once the drain's grace is over; the host exits 0", function()
      local process = "ExecDrain"
      new_item(process, "sleep")
      local h, d = start(process, { args = { "--grace", "1" } })
      local pid = sleeper_pid(h, d)
      h:kill("TERM")
      assert.equal(0, h:wait(30), h:stderr())
      assert.matches("grace period over: cancelling items in flight", h:stderr())
      assert.not_matches("slots did not stop", h:stderr())
      assert.same({ "canceled" }, outcomes(d))
      H.wait_until(function() return dead(pid) end, 5, "the sleep to be gone")
    end)

    it("starts no command once the lock is lost", function()
      local process = "ExecLoop"
      local m = new_item(process, "loop")
      local h, d = start(process, {})
      H.wait_until(function() return #lines(d .. "/appends") >= 3 end, 30,
        function() return "the body's commands to run\n" .. h:stderr() end)
      local code, out, err = H.run({ H.bin, "cancel", m, process }, { env = { BMDB_DSN = dsn } })
      assert.equal(0, code, out .. err)
      H.wait_until(function() return lines(d .. "/appends")[#lines(d .. "/appends")]:match("^again") and
                                     #lines(d .. "/appends") > 5 end, 20,
        function() return "the body to try again after the loss\n" .. h:stderr() end)
      h:kill("TERM")
      assert.equal(0, h:wait(30), h:stderr())
      local all = lines(d .. "/appends")
      local at
      for i, l in ipairs(all) do if l:match("^LOST") then at = i end end
      assert.is_truthy(at, "no LOST line")
      assert.is_true(at > 3)
      assert.same({ "LOST lost", "again lost", "again lost", "again lost", "again lost", "again lost" },
                  { unpack(all, at) })
      for i = 1, at - 1 do assert.equal("x", all[i]) end
    end)

    -- In the binary, where the host holds database connections, eventfds,
    -- a signalfd and a file the script opened (Lua's io.open does not set
    -- O_CLOEXEC): the child sees none of them. And a timeout ends a group
    -- whose grandchild ignores SIGTERM, leaving no zombie of the host's.
    it("leaves no descriptor of the host in the child, and no process or zombie after a timeout", function()
      local d = H.tmpdir("exec-oneoff")
      H.write_file(d .. "/oneoff.lua", [[
        local bmdb = require "bmdb"
        local held = assert(io.open(os.getenv("DIR") .. "/held", "w"))
        bmdb.transact(function(tx) tx:query("SELECT 1") end)
        local function words(s)
          local t = {}
          for w in s:gmatch("%S+") do t[#t + 1] = w end
          return table.concat(t, " ")
        end
        print("host fds: " .. words(bmdb.exec { argv = { "sh", "-c", "ls /proc/$PPID/fd" } }.stdout))
        print("child fds: " .. words(bmdb.exec { argv = { "sh", "-c", "ls /proc/$$/fd" } }.stdout))
        print("child " .. words(bmdb.exec { argv = { "grep", "^SigBlk:", "/proc/self/status" } }.stdout))
        local ok, err = pcall(bmdb.exec, { argv = { "sh", "-c", 'trap "" TERM; sleep 60 & echo $$ $!; wait' },
                                           timeout = 1, grace = 0.5 })
        print("timeout: " .. tostring(ok) .. " " .. tostring(err.kind) .. " " .. tostring(err.reason) ..
              " pids " .. words(err.stdout or ""))
        -- the host's children now (but the shell that lists them)
        local kids = bmdb.exec { argv = { "sh", "-c", "echo $$; cat /proc/$PPID/task/*/children" } }.stdout
        local me, zombies = kids:match("^(%d+)"), {}
        for pid in kids:gmatch("%d+") do
          local stat = pid ~= me and io.open("/proc/" .. pid .. "/stat")
          if stat then
            if stat:read("*a"):match("^%d+ %b() (%a)") == "Z" then zombies[#zombies + 1] = pid end
            stat:close()
          end
        end
        print("zombies: " .. #zombies)
        held:close()
      ]])
      local code, out, err = H.run({ H.bin, d .. "/oneoff.lua" }, { env = { BMDB_DSN = dsn, DIR = d } })
      assert.equal(0, code, err)
      local host = assert(out:match("host fds: ([^\n]*)"), out)
      local n = 0
      for _ in host:gmatch("%d+") do n = n + 1 end
      assert.is_true(n >= 8, "the host should hold several descriptors: " .. host)
      assert.matches("\nchild fds: 0 1 2\n", "\n" .. out)
      assert.matches("\nchild SigBlk: 0000000000000000\n", out) -- the host blocks TERM, INT, HUP and PIPE
      local sh, grandchild = out:match("\ntimeout: false exec timeout pids (%d+) (%d+)\n")
      assert.is_truthy(sh, out)
      assert.matches("\nzombies: 0\n", out)
      for _, pid in ipairs { sh, grandchild } do
        H.wait_until(function() return dead(pid) end, 10, "process " .. pid .. " to be gone")
      end
    end)
  end)
end)
