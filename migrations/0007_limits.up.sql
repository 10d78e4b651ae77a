-- Limits shared by the fleet (bmdb.limit, lua/bmdb/limit.lua). Only the
-- subset PostgreSQL and CockroachDB share: no triggers, no advisory locks.

-- One row per limit, written by every take: the spec of the script that
-- took last (the latest script wins) and, for a rate limit, its GCRA
-- state: tat, the theoretical arrival time of the next take. A name is
-- one kind of limit; a take of the other kind is refused.
CREATE TABLE limits (
    name TEXT NOT NULL PRIMARY KEY
        CHECK (name ~ '^[A-Za-z][A-Za-z0-9_.:-]*$' AND length(name) <= 63),
    kind TEXT NOT NULL CHECK (kind IN ('rate', 'concurrency')),
    rate FLOAT8,
    per FLOAT8,
    burst FLOAT8,
    concurrency INT8,
    tat TIMESTAMPTZ,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The places of concurrency limits that are held: one row per place
-- (0 .. concurrency - 1), so two takers of the same place conflict on
-- the primary key. A place belongs to a session and goes with it: ending
-- or collecting a session deletes its row, and the cascade frees its
-- places; a take also frees the places of sessions past their deadline.
-- token: the holder's, so a release deletes only its own place.
CREATE TABLE limit_places (
    name TEXT NOT NULL,
    place INT8 NOT NULL CHECK (place >= 0),
    session_id UUID NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    token UUID NOT NULL DEFAULT gen_random_uuid(),
    taken_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (name, place)
);
-- The cascade from sessions looks places up by session.
CREATE INDEX limit_places_session ON limit_places (session_id);
