-- bmdb/exec.lua -- bmdb.exec(opts): a command run as the body's I/O,
-- fenced by the session of the running item (none outside work). docs/talking-to-the-world.md,
-- "Commands: bmdb.exec", says what it does; host/lexec.c does it, and
-- checks the options.
local core = require "bmdb.core"
local T = require "bmdb.transact"

return function(opts)
  -- A tail call: a bad option is reported at the caller's line.
  return core.exec(opts, T.io_session())
end
