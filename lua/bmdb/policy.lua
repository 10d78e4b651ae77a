-- bmdb/policy.lua -- how much a worker's claim locks, and when a slot may
-- claim in a batch's transaction: claim_size, select_limit, time_item,
-- contended, may_claim_in_batch, batch_claimed. The counters they keep
-- are the scheduler's, one record per worker definition in this Lua
-- state (P.of): the user's definition table is never written.
local core = require "bmdb.core"
local K = core.kinds
local U = require "bmdb.util"
local is_error = U.is_error

local P = {}

-- Each worker definition's runtime record, kept as long as its definition:
--   claim_opts             what its claims store in the work row (serve sets it)
--   items_timed, item_seconds   how many items time_item timed, and their average
--   ahead_pause            claims left before it claims ahead again (contended)
--   batch_claim_pause      batches left before it claims in one again
--   batch_claim_failures   failed claims in a batch's transaction in a row
local records = setmetatable({}, { __mode = "k" })
function P.of(def)
  local r = records[def]
  if not r then
    r = {}
    records[def] = r
  end
  return r
end

-- The most items one claim locks: what the host reads back and hands out
-- of a claim (core.claim_max, SCHED_BATCH_MAX, 64); a lock of more
-- would leave the rest locked to no slot until the stray sweep.
local CLAIM_MAX = core.claim_max

-- The limit a claim that locks up to k items passes to select.
function P.select_limit(def, k)
  return def.batch_auto and math.max(def.batch, k) or def.batch
end

-- A worker that does not set `ahead` claims ahead only while its items
-- are short: as many items as its slots are expected to start within
-- AHEAD_WITHIN seconds, judged by how long this slot's recent items took
-- (a moving average), once it has timed AHEAD_AUTO_AFTER of them, and no
-- more than one claim holds (CLAIM_MAX, with what waits already). An
-- item's lock, Started row and timeout begin at its claim, so what
-- claiming ahead changes for an item is bounded by that wait; bare-metal
-- items of minutes are never claimed ahead, and short ones save a select
-- and a lock per item (the select's cost is mostly per call).
local AHEAD_AUTO = CLAIM_MAX
P.AHEAD_AUTO = AHEAD_AUTO -- (a definition's `ahead` when it sets none)
local AHEAD_WITHIN = 0.01
local AHEAD_AUTO_AFTER = 8
-- Claims of several hosts that read the same candidates meet: the later
-- one's lock waits for the earlier's COMMIT, then fails to serialize and
-- runs again, and a claim of many items meets others more often and makes
-- them wait longer. So after a conflict (a claim ran again) a worker's
-- slot claims ahead by default only after AHEAD_PAUSE more claims; a
-- further conflict starts the count again, so several hosts that keep
-- meeting do not claim ahead, and a host alone always may.
local AHEAD_PAUSE = 256
local function contended(def) P.of(def).ahead_pause = AHEAD_PAUSE end
P.contended = contended

-- Items claimed ahead for def's worker that wait in the host's queue of
-- handed items (none with `ahead = 0`, and then the host is not asked).
function P.waiting_ahead(def)
  return def.ahead > 0 and core.claim_queued(def.process) or 0
end

-- How many items a claim for `needed` slots locks, `waiting` items being
-- queued already: also as many as the worker holds ahead (def.ahead, or
-- by default what its recent items allow) beyond those, up to the
-- worker's `batch` when it sets one, and never more than CLAIM_MAX (so
-- what is claimed and what waits fit the host's queue). The items beyond the slots' need wait
-- in the queue, each slot taking the oldest when it comes back for its
-- next, so a worker of short items selects and locks once for several of
-- them instead of once per batch of finishes.
function P.claim_size(def, needed, waiting)
  local ahead = def.ahead
  if def.ahead_auto then
    local r = P.of(def)
    local t = r.item_seconds
    local pause = r.ahead_pause or 0
    if pause > 0 then r.ahead_pause = pause - 1 end
    if pause > 0 or (r.items_timed or 0) < AHEAD_AUTO_AFTER then ahead = 0
    -- the k-th item waiting starts after about k * t / concurrency
    else ahead = math.min(AHEAD_AUTO - needed, math.floor(AHEAD_WITHIN * def.concurrency / math.max(t, 1e-6))) end
  end
  local most = def.batch_auto and CLAIM_MAX or math.min(def.batch, CLAIM_MAX)
  return math.min(most, needed + math.max(0, ahead - waiting))
end

-- How long one of this slot's items took, body and finish, for a worker
-- that claims ahead by default (claim_size): a moving average over about
-- the last eight.
function P.time_item(def, seconds)
  local r = P.of(def)
  r.items_timed = (r.items_timed or 0) + 1
  local t = r.item_seconds
  r.item_seconds = t and t + (seconds - t) / 8 or seconds
end

-- Whether a slot of def's worker that closes a batch may claim in it.
-- Not after three failed claims there in a row (batch_claimed). And a
-- conflict fails a batch that claims whole, every member's finish with
-- it, where a claim in turn fails alone: so after one, a slot claims in
-- turn for its next BATCH_CLAIM_PAUSE batches. With one host there are
-- none, and with several the claims in batches stay the rarer ones.
local BATCH_CLAIM_PAUSE = 32
local function conflict(err)
  return is_error(err, K.sql) and (err.sqlstate == "40001" or err.sqlstate == "40P01")
end
function P.may_claim_in_batch(def)
  local r = P.of(def)
  if (r.batch_claim_failures or 0) >= 3 then return false end
  local pause = r.batch_claim_pause or 0
  if pause == 0 then return true end
  r.batch_claim_pause = pause - 1
  return false
end

-- What a claim in a batch's transaction (claim.lua's in_batch) settles:
-- ok and sent are its select's pcall (sent: whether it locked), committed
-- and err the batch's close.
function P.batch_claimed(def, ok, sent, committed, err)
  local r = P.of(def)
  if conflict(not ok and sent) or conflict(not committed and err) then
    -- Another host's claim or finish met this one (at the select, or at
    -- COMMIT): a conflict now costs the whole batch, so claim in turn for
    -- a while, and for longer without claiming ahead.
    r.batch_claim_pause = BATCH_CLAIM_PAUSE
    contended(def)
  elseif not ok and type(sent) == "table" and sent.deferred then
    -- A member's deferred statement failed in the select's flight: the
    -- member's failure (it finishes alone, and raises it), not the claim's.
  elseif ok and not (sent and is_error(err, K.sql) and err.sqlstate == "23503") then
    r.batch_claim_failures = 0
  else
    r.batch_claim_failures = (r.batch_claim_failures or 0) + 1
    if r.batch_claim_failures == 3 then
      core.log("warn", "claims in a batch's transaction failed three times; this slot claims in turn",
               { "process", def.process, "error", U.describe(ok and err or sent) })
    end
  end
end

return P
