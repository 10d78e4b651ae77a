-- A DSN's password never reaches any output: malformed URIs and keyword
-- strings, given by --dsn or BMDB_DSN, to every command that connects.
local H = require "support.helpers"
local core = require "bmdb.core"

describe("DSN errors", function()
  local dir, script

  setup(function()
    dir = H.tmpdir("dsn")
    script = dir .. "/ok.lua"
    H.write_file(script, "return\n")
  end)

  -- { dsn, what the message must say }; every password contains "S3cret".
  local cases = {
    { "postgresql://u:S3cretPW4@[::1:5432/x", 'matching "]" in IPv6 host address in URI' },
    { "postgresql://u:S3cret%zzPW@127.0.0.1:1/x", "invalid percent-encoded token" },
    { "postgresql://u:S3cret%00PW@127.0.0.1:1/x", "forbidden value %00 in percent-encoded value" },
    { "postgresql://u:S3cretPW@[]:1/x", "IPv6 host address may not be empty in URI" },
    { "postgresql://u:S3cretPW@127.0.0.1:1/x?S3cretPW", 'missing key/value separator "=" in URI query parameter' },
    { "postgres://u:S3cretPW@127.0.0.1:1/x?sslmode=a=b", 'extra key/value separator "=" in URI query parameter' },
    { "host=127.0.0.1 port=1 password='S3cretPW", "unterminated quoted string in connection info string" },
    { "host=127.0.0.1 port=1 S3cretPW", 'missing "=" after' },
    { "host=127.0.0.1 port=1 password=S3cretPW S3cretPW=1", "invalid connection option" },
    { "host=127.0.0.1 dbname", 'missing "=" after "dbname"' },
    -- well-formed, but the server is not there
    { "postgresql://u:S3cretPW@127.0.0.1:1/x", "cannot connect to database (host=127.0.0.1 port=1 dbname=x user=u)",
      parses = true },
    { "host=127.0.0.1 port=1 user=u password=S3cretPW", "cannot connect to database (host=127.0.0.1 port=1",
      parses = true },
    -- whatever libpq echoes at connect time, the password is scrubbed from it
    { "host=127.0.0.1 port=1 user=S3cretPW password=S3cretPW", "(host=127.0.0.1 port=1 dbname=*** user=***)",
      parses = true },
    { "postgresql://u:S3cretPW@127.0.0.1:1x/x", 'invalid integer value "1x" for connection option "port"',
      parses = true },
  }

  local commands = {
    { "a script", function() return { script } end },
    { "status", function() return { "status" } end },
    { "history", function() return { "history", "00000000-0000-0000-0000-000000000001" } end },
    { "migrate", function() return { "migrate" } end },
    { "migrate status", function() return { "migrate", "status" } end },
  }

  for _, case in ipairs(cases) do
    local dsn, says = case[1], case[2]
    it(string.format("%s: says %q and never prints the password", dsn, says), function()
      for _, cmd in ipairs(commands) do
        for _, via in ipairs { "--dsn", "BMDB_DSN" } do
          local argv, env = { H.bin }, { BMDB_DSN = false }
          if via == "--dsn" then
            argv[#argv + 1] = "--dsn"
            argv[#argv + 1] = dsn
          else
            env.BMDB_DSN = dsn
          end
          for _, a in ipairs(cmd[2]()) do argv[#argv + 1] = a end
          local code, out, err = H.run(argv, { env = env })
          local what = cmd[1] .. " via " .. via .. ": " .. out .. err
          assert.equal(1, code, what)
          assert.matches(says, err, 1, true, what)
          assert.is_nil((out .. err):find("S3cret", 1, true), what)
          if not case.parses then
            assert.matches("the DSN is not a valid libpq connection string or URI", err, 1, true, what)
          end
        end
      end
    end)
  end

  it("core.connect raises the same redacted message", function()
    for _, case in ipairs(cases) do
      local ok, e = pcall(core.connect, case[1])
      assert.is_false(ok)
      assert.matches(case[2], tostring(e), 1, true)
      assert.is_nil(tostring(e):find("S3cret", 1, true), tostring(e))
    end
  end)
end)
