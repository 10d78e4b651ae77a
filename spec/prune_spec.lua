-- History retention: bmdb-host prune against a real PostgreSQL, with a
-- real host claiming and finishing while it runs.
local H = require "support.helpers"

describe("bmdb-host prune", function()
  local dsn, admin, dir, session

  local function cli(...)
    return H.run({ H.bin, ... }, { env = { BMDB_DSN = dsn }, timeout = 300 })
  end

  local function n(sql, ...) return tonumber(admin:one(sql, ...).n) end

  local function new_machine()
    return admin:one("INSERT INTO machines DEFAULT VALUES RETURNING machine_id").machine_id
  end

  -- An event of (m, process), `age` old (a PostgreSQL interval).
  local function event(m, process, ev, age)
    return admin:one([[INSERT INTO work_history (machine_id, process, session_id, event, occurred_at)
                       VALUES ($1, $2, $3, $4, now() - $5::INTERVAL) RETURNING history_id]],
                     m, process, session, ev, age).history_id
  end

  setup(function()
    dsn, admin = H.open_core("prune_spec")
    dir = H.tmpdir("prune")
    -- A session of its own that stays live: the in-flight pairs' holder.
    session = admin:one([[INSERT INTO sessions (component_name, runtime_info, interval_seconds, deadline)
                          VALUES ('prune_spec', 'spec', 3600, now() + INTERVAL '1 day')
                          RETURNING session_id]]).session_id
  end)

  teardown(function() H.close_core(admin) end)

  it("refuses bad arguments with exit 2, naming what is wrong, before touching anything", function()
    local m = new_machine()
    event(m, "Bad", "Finished", "40 days")
    local cases = {
      { { "--keep-days", "soon" }, "--keep-days: expected a whole number from 0 to 36500, got 'soon'" },
      { { "--keep-days", "-1" }, "--keep-days: expected a whole number" },
      { { "--batch", "0" }, "--batch: expected a whole number from 1 to 100000, got '0'" },
      { { "--batch" }, "option --batch needs a value" },
      { { "--before", "yesterday-ish" }, "--before: not a timestamp: 'yesterday-ish'" },
      { { "--before", "2999-01-01T00:00:00Z" }, "--before: '2999-01-01T00:00:00Z' is in the future" },
      { { "--before", "2020-01-01", "--keep-days", "3" }, "--before and --keep-days exclude each other" },
      { { "--force" }, "unknown option '--force'" },
      { { "everything" }, "unexpected argument 'everything'" },
    }
    for _, c in ipairs(cases) do
      local code, _, err = cli("prune", (table.unpack or unpack)(c[1]))
      assert.equal(2, code, table.concat(c[1], " ") .. ": " .. err)
      assert.matches(c[2], err, 1, true)
    end
    assert.equal(1, n("SELECT count(*) AS n FROM work_history WHERE machine_id = $1", m))
    local code, out = cli("prune", "--keep-days", "0")
    assert.equal(0, code)
    assert.matches("--keep-days 0: history is kept, nothing pruned", out, 1, true)
    assert.equal(1, n("SELECT count(*) AS n FROM work_history WHERE machine_id = $1", m))
    -- --before as the server reads it: the row is 40 days old
    code, out = cli("prune", "--before", os.date("!%Y-%m-%dT%H:%M:%SZ", os.time() - 35 * 86400))
    assert.equal(0, code, out)
    assert.matches("^deleted %d+ history rows? older than", out)
    assert.equal(0, n("SELECT count(*) AS n FROM work_history WHERE machine_id = $1", m))
  end)

  it("deletes exactly the old rows not protected, in batches, while a host of 8 slots claims and finishes", function()
    -- The pairs whose latest event must stay, whatever its age.
    local inflight, backoff, fresh = new_machine(), new_machine(), new_machine()
    event(inflight, "Long", "Started", "90 days")
    event(inflight, "Long", "Failed", "80 days")
    local keep_inflight = event(inflight, "Long", "Started", "70 days")
    admin:exec("INSERT INTO work (machine_id, process, session_id) VALUES ($1, 'Long', $2)", inflight, session)
    event(backoff, "Flaky", "Started", "61 days")
    local keep_backoff = event(backoff, "Flaky", "Failed", "60 days")
    admin:exec([[INSERT INTO work_backoff (machine_id, process, backoff_until, last_seconds, cause)
                 VALUES ($1, 'Flaky', now() + INTERVAL '1 day', 3600, 'broken')]], backoff)
    -- in flight, but its latest event is recent: its old ones go
    event(fresh, "Long", "Started", "50 days")
    event(fresh, "Long", "Finished", "49 days")
    local recent = event(fresh, "Long", "Started", "1 day")
    admin:exec("INSERT INTO work (machine_id, process, session_id) VALUES ($1, 'Long', $2)", fresh, session)
    -- a finished pair: even its latest old event goes
    local done = new_machine()
    event(done, "Long", "Finished", "45 days")
    -- the bulk: old history of machines long gone, and some younger rows
    admin:exec([[INSERT INTO work_history (machine_id, process, session_id, event, occurred_at)
                 SELECT gen_random_uuid(), 'Bulk', $1, 'Finished', now() - INTERVAL '31 days' - i * INTERVAL '1 second'
                 FROM generate_series(1, 100000) AS g (i)]], session)
    admin:exec([[INSERT INTO work_history (machine_id, process, session_id, event, occurred_at)
                 SELECT gen_random_uuid(), 'Bulk', $1, 'Finished', now() - INTERVAL '29 days' + i * INTERVAL '1 second'
                 FROM generate_series(1, 500) AS g (i)]], session)
    -- loop_history: every old event goes (a loop's state is its loops row), the young stay
    admin:exec([[INSERT INTO loop_history (name, session_id, event, occurred_at)
                 SELECT 'reconcile', $1, 'Finished', now() - INTERVAL '31 days' - i * INTERVAL '1 minute'
                 FROM generate_series(1, 2500) AS g (i)]], session)
    admin:exec([[INSERT INTO loop_history (name, session_id, event, occurred_at)
                 SELECT 'reconcile', $1, 'Started', now() - INTERVAL '29 days' + i * INTERVAL '1 minute'
                 FROM generate_series(1, 40) AS g (i)]], session)
    local old_loops = "SELECT count(*) AS n FROM loop_history WHERE occurred_at < now() - INTERVAL '30 days'"
    assert.equal(2500, n(old_loops))
    local old = "SELECT count(*) AS n FROM work_history WHERE occurred_at < now() - INTERVAL '30 days'"
    local expected = n(old) - 2
    assert.equal(100000 + 8 - 2, expected)
    local young = n("SELECT count(*) AS n FROM work_history WHERE occurred_at >= now() - INTERVAL '30 days'")

    -- --dry-run counts and changes nothing
    local code, out, err = cli("prune", "--dry-run")
    assert.equal(0, code, err)
    assert.matches("dry run: would delete " .. expected + 2500 .. " history rows older than", out, 1, true)
    assert.matches("(work_history " .. expected .. ", loop_history 2500; ", out, 1, true)
    assert.equal(expected + 2, n(old))
    assert.equal(2500, n(old_loops))

    -- A host of 8 slots whose select offers many machines, each item short.
    local _, finished = H.spin_worker(admin, dir)
    -- Runs the host until `during` returns and at least `items` more are
    -- finished; its claims and retries from the stop line.
    local function host_run(items, during)
      -- (--keep-history 0: its own retention loop would prune beside the command)
      local h = H.spawn { argv = { H.bin, "--interval", "2", "--keep-history", "0", dir .. "/spin.lua" },
                          env = { BMDB_DSN = dsn } }
      local base = n(finished)
      H.wait_until(function() return n(finished) >= base + 20 end, 60, "the host to finish items")
      local result = during and { during() }
      H.wait_until(function() return n(finished) >= base + items end, 120, items .. " items")
      h:kill("TERM")
      assert.equal(0, h:wait(40), h:stderr())
      local claims, retries = h:stderr():match('msg="workers stopped" claims=(%d+) retries=(%d+)')
      assert.is_truthy(claims, h:stderr())
      return tonumber(claims), tonumber(retries), result
    end

    local claims0, retries0 = host_run(400)
    local claims1, retries1, res = host_run(400, function() return cli("prune") end)
    print(("\nprune_spec: claims and finishes retried: %d of %d claims without a prune, %d of %d with one running")
          :format(retries0, claims0, retries1, claims1))
    code, out, err = res[1], res[2], res[3]
    assert.equal(0, code, err)
    assert.matches("^deleted " .. expected + 2500 .. " history rows older than", out)
    assert.matches("(work_history " .. expected .. ", loop_history 2500; ", out, 1, true)
    local batches = tonumber(out:match("; (%d+) batches of at most 1000%)"))
    assert.is_truthy(batches, out)
    assert.is_true(batches >= (expected + 2500) / 1000, out)
    assert.equal(0, n(old_loops))
    assert.equal(40, n("SELECT count(*) AS n FROM loop_history"))

    -- exactly the protected rows are left of the old ones
    local left = {}
    for _, r in ipairs(admin:query([[SELECT history_id FROM work_history
                                     WHERE occurred_at < now() - INTERVAL '30 days' ORDER BY occurred_at]])) do
      left[#left + 1] = r.history_id
    end
    assert.same({ keep_inflight, keep_backoff }, left)
    assert.equal(1, n("SELECT count(*) AS n FROM work_history WHERE history_id = $1", recent))
    -- nothing younger went (the host only added to it)
    assert.is_true(n("SELECT count(*) AS n FROM work_history WHERE occurred_at >= now() - INTERVAL '30 days'")
                   >= young)

    -- a second run finds nothing more; a dry run agrees
    code, out = cli("prune", "--dry-run")
    assert.equal(0, code)
    assert.matches("dry run: would delete 0 history rows", out, 1, true)
  end)
end)
