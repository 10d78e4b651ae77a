-- Fleet state the shipped workers act on (examples/): a machine is
-- provided once a provider has created it, and a reported failure marks it
-- for recovery. Operators add their own tables in later migrations.
CREATE TABLE machine_provided (
    machine_id UUID NOT NULL PRIMARY KEY REFERENCES machines (machine_id) ON DELETE CASCADE,
    provider TEXT NOT NULL,
    provider_id TEXT NOT NULL,
    provided_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE machine_failures (
    machine_id UUID NOT NULL PRIMARY KEY REFERENCES machines (machine_id) ON DELETE CASCADE,
    reason TEXT NOT NULL,
    reported_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
