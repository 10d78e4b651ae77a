-- Work control (issue 12): item fences, timeouts, poison pills, operator
-- cancel, pause and hold. Only the subset PostgreSQL and CockroachDB share.

-- Each claim's token: every transaction of the body checks that its work
-- row with this token still exists (tx.c), so a body whose lock was taken
-- away (timeout, operator cancel, takeover) commits nothing. deadline is
-- when the claim's timeout ends, in database time (NULL: no timeout);
-- past it the row holds nothing and a claim takes it over. The backoff
-- spec the worker declared is stored at claim time, so whoever records
-- the item's death (takeover, collection) applies it: an item that kills
-- its holder each time backs off like any failure.
ALTER TABLE work ADD COLUMN token UUID NOT NULL DEFAULT gen_random_uuid();
ALTER TABLE work ADD COLUMN deadline TIMESTAMPTZ;
ALTER TABLE work ADD COLUMN timeout_seconds NUMERIC;
ALTER TABLE work ADD COLUMN backoff_initial INT8;
ALTER TABLE work ADD COLUMN backoff_maximum INT8;
ALTER TABLE work ADD COLUMN backoff_exponent NUMERIC;

-- Which claim an event belongs to (NULL before this migration and for
-- events of no claim), so a body told "lost" can be told why.
ALTER TABLE work_history ADD COLUMN token UUID;
-- Hold and unhold are recorded in the machine's history; they belong to
-- an operator, not to a session.
ALTER TABLE work_history ALTER COLUMN session_id DROP NOT NULL;
ALTER TABLE work_history DROP CONSTRAINT IF EXISTS work_history_event_check;
ALTER TABLE work_history DROP CONSTRAINT IF EXISTS check_event;
ALTER TABLE work_history ADD CONSTRAINT work_history_event CHECK (event IN
    ('Started', 'Finished', 'Failed', 'Canceled', 'Abandoned', 'Held', 'Unheld'));

-- The processes workers run (registered by hosts as their workers start)
-- and their fleet-wide pause: no claim of a paused process succeeds.
CREATE TABLE processes (
    process TEXT NOT NULL PRIMARY KEY
        CHECK (process ~ '^[A-Za-z][A-Za-z0-9_]*$' AND length(process) <= 63),
    paused_at TIMESTAMPTZ,
    pause_reason TEXT
);

-- Machines no process may claim (maintenance, a person at the rack).
CREATE TABLE machine_holds (
    machine_id UUID NOT NULL PRIMARY KEY REFERENCES machines (machine_id) ON DELETE CASCADE,
    reason TEXT,
    held_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- work_blocked now also lists the pairs a pause or a hold blocks, and no
-- longer a work row past its timeout (a claim takes it over). Every
-- branch still resolves by primary key for a given (machine, process):
-- a hold blocks the machine for every registered process, and the claim
-- itself refuses a held machine or a paused process whatever select says.
DROP VIEW work_blocked;
CREATE VIEW work_blocked AS
    SELECT w.machine_id, w.process
    FROM work w JOIN sessions s ON s.session_id = w.session_id
    WHERE s.deadline > now() AND (w.deadline IS NULL OR w.deadline > now())
    UNION ALL
    SELECT b.machine_id, b.process
    FROM work_backoff b
    WHERE b.backoff_until > now()
    UNION ALL
    SELECT m.machine_id, p.process
    FROM processes p CROSS JOIN machines m
    WHERE p.paused_at IS NOT NULL
    UNION ALL
    SELECT h.machine_id, p.process
    FROM machine_holds h CROSS JOIN processes p;
