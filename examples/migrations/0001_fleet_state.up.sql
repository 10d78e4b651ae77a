-- Fleet state the example workers act on: a machine is provided once a
-- provider has created it, and a reported failure marks it for recovery.
-- Applied with `bmdb-host --migrations examples/migrations`, after the
-- core's migrations. IF NOT EXISTS: a database that applied the core's
-- retired migration 0003 already has these tables (with its rows); this
-- adopts them as they are.
CREATE TABLE IF NOT EXISTS machine_provided (
    machine_id UUID NOT NULL PRIMARY KEY REFERENCES machines (machine_id) ON DELETE CASCADE,
    provider TEXT NOT NULL,
    provider_id TEXT NOT NULL,
    provided_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS machine_failures (
    machine_id UUID NOT NULL PRIMARY KEY REFERENCES machines (machine_id) ON DELETE CASCADE,
    reason TEXT NOT NULL,
    reported_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
