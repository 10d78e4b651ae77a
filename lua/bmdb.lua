-- bmdb.lua -- the `bmdb` module scripts use: the documented API only.
--
--   transact, work, try_work, backoff_next, session, sleep, log, wake,
--   worker, is_error, cancel, pause, resume, hold, unhold, retry, http, json,
--   exec, limit, metrics, loop
--
-- docs/api.md describes each (worker: docs/workers.md; cancel, pause,
-- resume, hold, unhold, retry: docs/work-control.md; http, json, exec, limit:
-- docs/talking-to-the-world.md; metrics: docs/operations.md). The implementation, and what the
-- host, bmdb.testing and the specs use besides, is bmdb.internal.
local I = require "bmdb.internal"

return {
  transact = I.transact,
  work = I.work,
  try_work = I.try_work,
  backoff_next = I.backoff_next,
  session = I.session,
  sleep = I.sleep,
  log = I.log,
  wake = I.wake,
  worker = I.worker,
  is_error = I.is_error,
  cancel = I.cancel,
  pause = I.pause,
  resume = I.resume,
  hold = I.hold,
  unhold = I.unhold,
  retry = require("bmdb.control").retry,
  http = { request = require("bmdb.http").request },
  json = require "bmdb.json",
  exec = require "bmdb.exec",
  limit = require("bmdb.limit").limit,
  metrics = require "bmdb.metrics",
  loop = I.loop,
}
