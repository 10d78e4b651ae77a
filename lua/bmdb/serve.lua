-- bmdb/serve.lua -- one slot's loop (serve, which the host's slot threads
-- call: lstate.c): claim, run, decide, until the host drains, the code
-- changes or the slot's worker is gone. It tells the finish path which
-- item it runs (work.lua's set_loop), so the finish that ends it may
-- claim its next in the same transaction (claim.lua's in_batch).
local core = require "bmdb.core"
local K = core.kinds
local U = require "bmdb.util"
local B = require "bmdb.backoff"
local P = require "bmdb.policy"
local W = require "bmdb.work"
local D = require "bmdb.define"
local C = require "bmdb.claim"
local is_error, describe = U.is_error, U.describe

local M = {}

-- The item this slot's loop runs now ({w, def, generation}, and, once
-- its finish also claimed, next: the item its batch's claim locked for
-- it, lsched.c's item table).
local serving = nil

-- For a finish of w in a batch: this loop's record when w is the item it
-- runs and it will run a next one on this code, and whether the batch
-- may claim that one.
local function ending(w)
  local s = serving
  if s and s.w == w and not s.next and core.state() == "running" and core.generation() == s.generation then
    return s, P.may_claim_in_batch(s.def)
  end
end

-- One slot's loop: claim, run, decide, until the host drains ("stop"), the
-- code changes ("reload") or this slot's worker is gone ("removed").
function M.serve(result, process, index, generation)
  local def
  for _, d in ipairs(D.workers(result) or {}) do
    if d.process == process then def = d end
  end
  if not def or index > def.concurrency then return "removed" end
  P.of(def).claim_opts = B.claim_opts(def.backoff, def.timeout)
  -- What this worker claimed ahead by default is given back when it has
  -- waited long (host/sched.h, SCHED_GIVE_BACK_S); what it asked for, it keeps.
  core.claim_give_back(def.process, def.ahead_auto)
  W.set_slot(index)
  W.set_loop(ending, C.in_batch)
  math.randomseed(core.seed())
  local pending -- claimed by the batch that finished the item before (claim.lua's in_batch)
  local function run(w)
    serving = { w = w, def = def, generation = generation }
    local t0 = def.ahead_auto and core.now()
    pcall(W.run, w, def.run) -- the decision is recorded and logged
    if t0 then P.time_item(def, core.now() - t0) end
    local n = serving.next
    serving = nil
    pending = n and C.adopt(def, n)
  end
  while true do
    if core.state() ~= "running" or core.generation() ~= generation then
      local w = pending or C.take_handed(def)
      if not w then return core.state() ~= "running" and "stop" or "reload" end
      run(w)
      goto continue
    end
    local ok, w
    if pending then
      ok, w = true, pending
    else
      ok, w = pcall(C.in_turn, def, nil, generation)
    end
    if not ok then
      if core.state() ~= "running" then
        -- draining or cancelling: the loop ends at the top
      elseif is_error(w, K.sql) and (w.sqlstate == "40001" or w.sqlstate == "40P01") then
        -- Contention that outlasted the retries: nothing failed; this
        -- slot backs off and claims again.
        core.log("info", "claim contended, backing off", { process = def.process, error = tostring(w) })
      elseif U.outage("claim", w) then
        -- the database is out, or a standby: the host's one account of it
      else
        core.log("warn", "claim failed", { process = def.process, error = describe(w) })
      end
      core.idle_wait(def.process, def.poll * (0.8 + 0.4 * math.random()))
    elseif w then
      core.wake_local(def.process) -- there may be more: pass the baton
      run(w)
    elseif core.state() ~= "running" or core.generation() ~= generation then
      -- the claim gave way to a drain or a reload: the top of the loop says which
    else
      core.count("empty", def.process)
      core.log("debug", "slot idle", { "process", def.process, "slot", index })
      core.idle_wait(def.process, def.poll * (0.8 + 0.4 * math.random()))
    end
    ::continue::
  end
end

return M
