-- bmdb/internal.lua -- the implementation behind the `bmdb` module, as
-- one table. lua/bmdb.lua exports its documented part; the rest (serve,
-- specs, workers, problems, claim, lock, run, describe, retry_seconds,
-- ...) is for the host (lstate.c calls serve and specs by name),
-- bmdb.testing and the specs. It runs unchanged in the binary (where it
-- is embedded) and under busted (where bmdb.core is build/bmdb/core.so).
--
-- The C core (bmdb.core) does SQL, sessions and locks; the policies are
-- in these modules, each requiring only those before it:
--
--   util       raise, argerror, is_error, finite, describe
--   backoff    backoff specs: backoff_next, claim_opts
--   transact   fenced transactions, their retries; the running item, the open tx
--   policy     how much a claim locks; when a batch may claim (per-worker records)
--   work       the work item: lock, run, finish/fail/cancel, at_item_end
--   loop       singleton loops (bmdb.loop): definitions, a loop's thread
--   define     bmdb.worker, workers, specs (the loops' too), problems
--   services   session, sleep, log, wake
--   control    cancel, pause, resume, hold, unhold
--   claim      the claim path: in the host's turn, or in a batch of finishes
--   serve      the slot loop
--
-- Errors (docs/api.md, "Errors"): every failure is an error object with a kind.
-- Programming errors (kind usage, nested, closed, definition) and lost
-- fences (session_expired, lost, canceled), like sql and connection
-- failures, are raised. Outcomes a correct script must expect -- the pair
-- is held by someone else, or in backoff -- are raised by bmdb.work and
-- returned as nil, err by bmdb.try_work.
local U = require "bmdb.util"
local B = require "bmdb.backoff"
local T = require "bmdb.transact"
local D = require "bmdb.define"
local W = require "bmdb.work"
local S = require "bmdb.services"
local Ctl = require "bmdb.control"
local C = require "bmdb.claim"
local serve = require "bmdb.serve"
local Loop = require "bmdb.loop"

local I = {
  raise = U.raise,
  is_error = U.is_error,
  describe = U.describe,
  backoff_next = B.backoff_next,
  claim_opts = B.claim_opts,
  transact = T.transact,
  io_session = T.io_session,
  problems = D.problems,
  worker = D.worker,
  workers = D.workers,
  specs = D.specs,
  lock = W.lock,
  new_work = W.new_work,
  run = W.run,
  work = W.work,
  try_work = W.try_work,
  at_item_end = W.at_item_end,
  session = S.session,
  sleep = S.sleep,
  log = S.log,
  wake = S.wake,
  cancel = Ctl.cancel,
  pause = Ctl.pause,
  resume = Ctl.resume,
  hold = Ctl.hold,
  unhold = Ctl.unhold,
  claim = C.in_turn,
  serve = serve.serve,
  loop = Loop.loop,
  serve_loop = Loop.serve_loop,
}

-- retry_seconds is transact.lua's: read and set through this table, as
-- the specs do to keep retries short.
return setmetatable(I, {
  __index = function(_, k)
    if k == "retry_seconds" then return T.retry_seconds end
  end,
  __newindex = function(t, k, v)
    if k == "retry_seconds" then T.retry_seconds = v else rawset(t, k, v) end
  end,
})
