-- Singleton loops (bmdb.loop): one row per loop name, held by at most one
-- live session in the fleet. The row outlives its holder (no foreign key
-- to sessions): it keeps the fleet's schedule (next_run_at, set from the
-- end of the last run) and the backoff of failed runs across takeovers.
-- A hold is free when session_id is NULL or names a session that is gone
-- or past its deadline. A run's transactions are fenced by the row with
-- the hold's token, locked FOR SHARE to COMMIT, so whoever takes the hold
-- over (an UPDATE of the row) waits for the last of them.
CREATE TABLE loops (
    name TEXT NOT NULL PRIMARY KEY
        CHECK (name ~ '^[A-Za-z][A-Za-z0-9_.:-]*$' AND length(name) <= 58),
    session_id UUID,
    token UUID,
    held_since TIMESTAMPTZ,
    next_run_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_started_at TIMESTAMPTZ,
    last_finished_at TIMESTAMPTZ,
    -- Consecutive failed runs, the backoff period applied after the last
    -- one (grown like work's), and its cause.
    failures INT8 NOT NULL DEFAULT 0,
    last_seconds INT8,
    last_cause TEXT
);

-- What each loop did, and who held it: Taken and Released name the hold,
-- Started, Finished and Failed (with its cause) each run.
CREATE TABLE loop_history (
    history_id UUID NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY,
    name TEXT NOT NULL,
    session_id UUID NOT NULL,
    event TEXT NOT NULL
        CHECK (event IN ('Taken', 'Started', 'Finished', 'Failed', 'Released')),
    cause TEXT,
    occurred_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX loop_history_name ON loop_history (name, occurred_at);
-- Retention walks it oldest first, as work_history_age does.
CREATE INDEX loop_history_age ON loop_history (occurred_at, history_id);
