-- bmdb/retention.lua -- history retention as a built-in singleton loop,
-- "bmdb:retention", which bmdb.loop adds to every worker script: one host
-- of the fleet prunes work_history and loop_history older than
-- --keep-history days (docs/operations.md, "History retention").
--
-- A run is what `bmdb-host prune` does (host/prune.c, the same batches):
-- short READ COMMITTED batches over the age indexes, each one its own
-- transaction, the latest event of a pair in flight or in backoff kept,
-- a pause between batches so that claims and finishes have the server to
-- themselves. It stops when nothing older than the cutoff is left, or as
-- soon as the hold is no longer this host's or the host starts to stop.
local core = require "bmdb.core"

local R = {}

-- Every ten minutes: the cutoff moves by that much between runs, nothing
-- an operator keeping days of history notices, and a run that finds
-- nothing to do is one short read of the oldest index entries.
R.EVERY = 600
-- Rows a batch looks at, and the pause after each, as the command line's.
R.BATCH = 1000
R.PAUSE = 0.02

-- One run: prunes to now() - days, batch after batch, while alive().
-- Returns the rows deleted, and whether it stopped early (the hold lost).
function R.prune(days, alive, sleep)
  local cutoff = core.prune_cutoff(days)
  local cursor, total = nil, 0
  while true do
    if not alive() then return total, true end
    local n, more
    n, more, cursor = core.prune_batch(cutoff, R.BATCH, cursor)
    total = total + n
    if not more then return total, false end
    sleep(R.PAUSE)
  end
end

-- The loop, or nil when --keep-history is 0 (history kept for good).
function R.loop()
  local days = core.keep_history()
  if days == 0 then return nil end
  local S = require "bmdb.services"
  return require("bmdb.loop").define {
    name = "bmdb:retention",
    every = R.EVERY,
    _builtin = true,
    run = function(l)
      -- A host that drains stops between batches too: the next holder
      -- carries on, and the drain does not wait for a long backlog.
      local n, stopped = R.prune(days, function() return l:alive() and core.state() == "running" end, S.sleep)
      if n > 0 or stopped then
        S.log.info(stopped and "retention: stopped before the end (hold lost or host stopping)"
                   or "retention: history pruned",
                   { deleted = tostring(n), keep_days = tostring(days) })
      end
    end,
  }
end

return R
