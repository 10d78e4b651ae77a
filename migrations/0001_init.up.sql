-- The BMDB core: machines, sessions kept alive by heartbeats, work rows that
-- lock one (machine, process) to one session, the audit trail and backoffs.
-- Only the subset PostgreSQL and CockroachDB share: no triggers, no advisory
-- locks, no enums (process names are TEXT under a CHECK, so a new process
-- needs no migration).

CREATE TABLE machines (
    machine_id UUID NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE sessions (
    session_id UUID NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY,
    component_name TEXT NOT NULL,
    runtime_info TEXT NOT NULL,
    interval_seconds INT8 NOT NULL CHECK (interval_seconds > 0),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    deadline TIMESTAMPTZ NOT NULL
);
-- Garbage collection looks for sessions past their deadline.
CREATE INDEX sessions_deadline ON sessions (deadline);

CREATE TABLE work (
    machine_id UUID NOT NULL REFERENCES machines (machine_id) ON DELETE CASCADE,
    process TEXT NOT NULL
        CHECK (process ~ '^[A-Za-z][A-Za-z0-9_]*$' AND length(process) <= 63),
    session_id UUID NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- At most one holder of a process per machine.
    PRIMARY KEY (machine_id, process)
);
CREATE INDEX work_session ON work (session_id);

-- The audit trail outlives sessions and machines, so it has no foreign keys.
CREATE TABLE work_history (
    history_id UUID NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY,
    machine_id UUID NOT NULL,
    process TEXT NOT NULL,
    session_id UUID NOT NULL,
    event TEXT NOT NULL
        CHECK (event IN ('Started', 'Finished', 'Failed', 'Canceled', 'Abandoned')),
    cause TEXT,
    occurred_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX work_history_machine ON work_history (machine_id, occurred_at);

-- A failed (machine, process) is not picked again before backoff_until.
-- last_seconds is the period that was applied, so the next failure can
-- grow it; attempts counts consecutive failures.
CREATE TABLE work_backoff (
    machine_id UUID NOT NULL REFERENCES machines (machine_id) ON DELETE CASCADE,
    process TEXT NOT NULL
        CHECK (process ~ '^[A-Za-z][A-Za-z0-9_]*$' AND length(process) <= 63),
    backoff_until TIMESTAMPTZ NOT NULL,
    last_seconds INT8 NOT NULL CHECK (last_seconds >= 1),
    attempts INT8 NOT NULL DEFAULT 1,
    cause TEXT NOT NULL,
    PRIMARY KEY (machine_id, process)
);
CREATE INDEX work_backoff_until ON work_backoff (process, backoff_until);
