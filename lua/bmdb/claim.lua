-- bmdb/claim.lua -- the claim path: how a slot gets its next work item.
-- Claims run in the host's claim turn (host/sched.h), for every slot of the
-- process that waits: in two round trips when all goes well (claim_fast),
-- else the full claim, which learns why a candidate cannot be locked; or
-- in the transaction of a batch of finishes that this slot closes
-- (in_batch). Items locked for other slots are handed to them through
-- the host (core.claim_hand) and adopted there. How many a claim locks
-- is policy.lua's.
local core = require "bmdb.core"
local K = core.kinds
local U = require "bmdb.util"
local T = require "bmdb.transact"
local W = require "bmdb.work"
local P = require "bmdb.policy"
local raise, is_error, describe = U.raise, U.is_error, U.describe
local transact_on, new_work = T.transact_on, W.new_work

local C = {}

local function shuffle(t)
  for i = #t, 2, -1 do
    local j = math.random(i)
    t[i], t[j] = t[j], t[i]
  end
end

-- Reads whether def's process is paused, for the host to log once per
-- change; true when it is. Read on an idle select, which cannot tell a
-- pause from no work (the host logs a pause once it learns of it, work or
-- not); a claim that locks nothing learns it in the full claim instead.
local function read_pause(tx, def)
  local why = core.paused(tx, def.process)
  core.note_pause(def.process, why ~= nil, why)
  return why ~= nil
end

-- A process this host last saw paused: read the pause alone, not select
-- (a select may be heavy, and a pause is often asked for to quiet the
-- database), until a read finds it resumed. True while it stays paused.
local function still_paused(tx, def)
  return core.seen_paused(def.process) and read_pause(tx, def)
end

-- select's rows as machine ids; nil when they are not a list of rows or
-- ids that are machine ids (the full claim then says what is wrong).
local function candidate_ids(rows)
  if type(rows) ~= "table" then return nil end
  local ids = {}
  for i, r in ipairs(rows) do
    local id = type(r) == "table" and r.machine_id or r
    if type(id) ~= "string" or not core.valid_uuid(id) then return nil end
    ids[i] = id
  end
  return ids
end

-- What a committed claim that locked something (core.claimed) settles:
-- the process is not paused, and each item counts as a claim.
local function note_claimed(def, n)
  core.note_pause(def.process, false)
  for _ = 1, n do core.count("claim") end
end

-- The usual claim in two round trips: BEGIN, the fence and the select's
-- statement in one; the lock of up to k free candidates (in random order)
-- with COMMIT in the other (core.lock_any). Returns true and the list of
-- items it locked (core.claimed: empty when select found nothing),
-- or false when the full claim below must decide: no candidate was free
-- in our snapshot, select returned something that is not a machine id,
-- or the lock failed (a machine that does not exist). A drain that begins
-- while we select wins. A process last seen paused reads only the pause.
local function claim_fast(def, sess, k)
  local sent, attempts = nil, 0
  local claim_opts = P.of(def).claim_opts
  local ok, outcome = pcall(transact_on, sess, function(tx)
    sent = nil
    attempts = attempts + 1
    -- a retry: another host's claim or finish met ours (claim_size)
    if attempts == 2 then P.contended(def) end
    if still_paused(tx, def) then return "idle" end
    local ids = candidate_ids(def.select(tx, P.select_limit(def, k)))
    if not ids then return "full" end
    if #ids == 0 then
      read_pause(tx, def)
      return "idle"
    end
    shuffle(ids)
    if core.state() ~= "running" then raise(K.draining, 0, "draining: no new claims") end
    core.lock_any(tx, ids, def.process, claim_opts, k)
    sent = tx
    return "sent"
  end)
  if not ok then
    if is_error(outcome, K.sql) and outcome.sqlstate == "23503" then return false end
    error(outcome, 0)
  end
  if outcome == "idle" then return true, {} end
  if outcome ~= "sent" then return false end
  local locked = core.claimed(sent)
  if #locked == 0 then return false end
  note_claimed(def, #locked)
  return true, locked
end

-- The full claim: selects candidates and locks one, in one transaction,
-- learning why a candidate cannot be locked and taking over the locks of
-- ended sessions. Candidates are
-- tried in random order so slots that read the same candidates spread
-- over them instead of colliding on the first. opts (bmdb.testing):
-- ordered = keep select's order; machine = only that candidate.
--
-- A candidate that is not a machine id, or names no machine, is skipped
-- with a warning: one bad row from select must not stop the worker. Ids
-- are checked before locking; whether a machine exists is only learned
-- when the lock's INSERT fails (23503, which aborts the transaction), so
-- the claim then runs again and checks that id first. A correct select
-- pays nothing for this.
-- A candidate as the log shows it: an id string as it is; anything else
-- with its type, and the field it came from when select returned rows
-- (`machine_id = true (a boolean, not a machine id)`).
local function shown(row, id)
  if type(id) == "string" then return id end
  local what = type(id) == "table" and "(a table, not a machine id)" or "(a " .. type(id) .. ", not a machine id)"
  local text = type(id) == "table" and describe(id):gsub("^%(error object is a table: (.*)%)$", "%1") or tostring(id)
  if type(row) == "table" then
    if id == row then return text .. " (a row with no machine_id field)" end
    return "machine_id = " .. text .. " " .. what
  end
  return text .. " " .. what
end

local function claim(def, opts)
  local sess = core.session(1)
  local claim_opts = P.of(def).claim_opts
  local suspects, warned = {}, {}
  local first_ghost, ghosts -- the first candidate whose lock found no machine, and how many did
  local function skip(id, why, row)
    if warned[id] then return end
    warned[id] = true
    core.log("warn", "claim skipped a candidate", { "process", def.process,
      "candidate", shown(row, id), "reason", why })
  end
  for _ = 1, def.batch + 1 do
    local trying
    local started = core.now()
    local ok, item = pcall(transact_on, sess, function(tx)
      local rows = def.select(tx, def.batch)
      if type(rows) ~= "table" then
        raise(K.usage, 0, "worker " .. def.process .. ": select must return a list of rows, got " .. type(rows))
      end
      local ids = {}
      for _, r in ipairs(rows) do
        local id = r
        if type(r) == "table" and r.machine_id ~= nil then id = r.machine_id end
        if not (opts and opts.machine) or id == opts.machine then ids[#ids + 1] = { id, r } end
      end
      if not (opts and opts.ordered) then shuffle(ids) end
      if #ids == 0 then read_pause(tx, def) end
      for _, pair in ipairs(ids) do
        local id, row = pair[1], pair[2]
        if type(id) ~= "string" or not core.valid_uuid(id) then
          skip(id, "not a machine id (a UUID)", row)
        elseif suspects[id] and not tx:one("SELECT 1 AS x FROM machines WHERE machine_id = $1", id) then
          skip(id, "no such machine (machines has no row with this id)", row)
        else
          trying = id
          local status, detail = core.lock(tx, id, def.process, claim_opts)
          trying = nil
          if status == "locked" then
            -- A drain that began while we selected wins: roll the claim back.
            -- A select that starts after the drain always sees it here.
            if core.state() ~= "running" then raise(K.draining, 0, "draining: no new claims") end
            core.note_pause(def.process, false)
            return detail
          elseif status == "paused" then
            core.note_pause(def.process, true, detail)
            return nil
          end
        end
      end
    end)
    if ok then
      if item then
        core.count("claim")
        item.started = started
        return new_work(sess, def, item)
      end
      return nil
    end
    local err = item
    if not (trying and not suspects[trying] and is_error(err, K.sql) and err.sqlstate == "23503") then
      error(err, 0)
    end
    suspects[trying] = true
    first_ghost, ghosts = first_ghost or trying, (ghosts or 0) + 1
  end
  raise(K.claim, 0, "worker " .. def.process .. ": too many candidates failed to lock: " .. ghosts ..
    " named no machine (machines has no row with that id), the first " .. first_ghost ..
    "; select must return ids of rows in machines")
end

-- An item locked for this slot by another's claim (handed to it, or
-- claimed in the batch that finished its item before; it names its
-- session and when its claim began): the work item, or nil when it is not
-- this slot's to run any more.
local function adopt(def, item)
  local sess = core.session(1)
  -- A lock taken under a session that has since been lost is not ours.
  if sess:id() ~= item.session_id then return nil end
  -- Nor one whose timeout passed while it waited (claimed ahead): its
  -- body must not start, and the row is the timeout's to record. (A
  -- cancel while it waits is learned as for any item: the body's first
  -- transaction finds its lock gone. One that waits long is given back
  -- before that: host/sched.h, SCHED_GIVE_BACK_S.)
  if def.timeout and core.now() >= item.started + def.timeout then
    core.log("info", "claimed item not started: its timeout passed while it waited",
             { "session", item.session_id, "machine", item.machine, "process", def.process, "timeout", def.timeout })
    return nil
  end
  return new_work(sess, def, item)
end
C.adopt = adopt

-- An item claimed for a slot that turned out not to be there: let go.
local function let_go(def, sess, item)
  pcall(transact_on, sess, function(tx)
    core.release(tx, item.machine, def.process, "Canceled", "claimed for a slot that was not there", 1, item.token)
  end)
end

-- A claim for several slots keeps the first item it locked and hands
-- the others to the slots of its process that wait (core.claim_hand),
-- each naming what adopting it needs: its process, session and when its
-- claim began.
local function hand_out(def, sess, locked, started)
  local session_id = sess:id()
  for i, item in ipairs(locked) do
    item.process, item.session_id, item.started = def.process, session_id, started
    -- No room to hand it (more than SCHED_QUEUE_MAX): let it go.
    if i > 1 and not core.claim_hand(item) then let_go(def, sess, item) end
  end
end

local function claim_as_claimer(def, opts)
  if opts then return claim(def, opts) end
  local sess = core.session(1)
  local started = core.now()
  local k = P.claim_size(def, 1 + core.claim_waiters(def.process), P.waiting_ahead(def))
  local settled, locked = claim_fast(def, sess, k)
  if not settled then return claim(def) end
  if #locked == 0 then return nil end
  hand_out(def, sess, locked, started)
  return new_work(sess, def, locked[1])
end

-- A claim in the host's turn (host/sched.h: claims run alone, and claim for
-- every slot of the process that waits to). Returns the work item for
-- this slot, or nil.
function C.in_turn(def, opts, generation)
  while true do
    local got, item = core.claim_enter(def.process, 0.5)
    if got == "turn" then
      -- The wait for the turn can be long enough for a reload or a drain
      -- to begin: then this slot claims nothing on the old code.
      if core.state() == "running" and (not generation or core.generation() == generation) then break end
      core.claim_leave()
      return nil
    end
    if got == "handed" then
      local w = adopt(def, item)
      if w then return w end
    elseif core.state() ~= "running" then -- "timeout"
      return nil
    end
  end
  local r = { pcall(claim_as_claimer, def, opts) }
  core.claim_leave()
  if not r[1] then error(r[2], 0) end
  return r[2]
end

-- select, and the lock of up to k of its candidates as tx's final
-- statement; true when that lock was set.
local function select_and_lock(def, tx, k)
  if still_paused(tx, def) then return false end
  local ids = candidate_ids(def.select(tx, P.select_limit(def, k)))
  if not ids or #ids == 0 or core.state() ~= "running" then return false end
  shuffle(ids)
  core.lock_any(tx, ids, def.process, P.of(def).claim_opts, k)
  return true
end

-- What a batch's closer lets go of if its select is left behind: the
-- batch commits what it has without the claim (which lets the claim turn
-- go too).
local function close_batch() core.batch_close(false) end

-- The claim of the slot that closes a batch of finishes, in the batch's
-- transaction (core.batch_leave answered "claim": the batch's members
-- are the host's only finishes in flight, and this slot holds the claim
-- turn). It claims for itself, for the batch's members of its worker
-- (peers: they claim next) and for the slots that wait, as a claim in
-- turn would; the releases ride with the select's statement and the lock
-- with COMMIT. So items end and the next are claimed in one transaction:
-- at one slot that is every item, three round trips for both. A lost
-- session or lock, or any failure, commits neither the releases nor the
-- claim (the members then finish alone). A select that fails, or offers
-- a machine that does not exist, costs the batch; after three such
-- failures in a row this slot's worker claims only in turn, where the
-- full claim says what is wrong (policy.lua's batch_claimed). What it
-- claimed for itself becomes s.next, which the serve loop runs next.
-- Returns as core.batch_close: "committed", or nil and the batch's error.
function C.in_batch(w, tx, s, peers)
  T.hold(close_batch)
  local def = s.def
  local started = core.now()
  local needed = peers + core.claim_waiters(def.process)
  local ok, sent = true, false
  -- Items claimed ahead that cover every slot of this claim: the batch
  -- only commits its releases, and the slots take those items next.
  local waiting = P.waiting_ahead(def)
  if waiting < needed then
    T.set_open(tx, nil)
    ok, sent = pcall(select_and_lock, def, tx, P.claim_size(def, needed, waiting))
    T.set_open(nil, nil)
  end
  T.unhold()
  -- The batch's members and the waiting slots are handed their items
  -- there; what is left is this slot's, and what fitted nowhere.
  local committed, locked, handed = core.batch_close(ok and sent, started)
  if not committed then
    P.batch_claimed(def, ok, sent, false, locked) -- (locked: the batch's error)
    return nil, locked
  end
  if #locked > 0 then
    note_claimed(def, #locked + handed)
    s.next = locked[1] -- (named by its session and its claim's start, as handed items are)
    for i = 2, #locked do let_go(def, T.item_session(w), locked[i]) end
  end
  P.batch_claimed(def, ok, sent, true, nil)
  return committed
end

-- An item a claimer handed to this process's slots that none took (they
-- stopped waiting: a drain or a reload began): this slot runs it before
-- it leaves the loop, as it would an item it had claimed itself.
function C.take_handed(def)
  while true do
    local item = core.claim_take(def.process)
    if not item then return nil end
    local w = adopt(def, item)
    if w then return w end
  end
end

return C
