-- What a worker's select must skip: (machine, process) pairs held by a
-- live session or in backoff. Both branches resolve by primary key, so
--   NOT EXISTS (SELECT 1 FROM work_blocked b
--               WHERE b.machine_id = m.machine_id AND b.process = $1)
-- stays a pair of index lookups per candidate, whatever the fleet size.
-- Work of an expired session does not block: a claim takes it over.
CREATE VIEW work_blocked AS
    SELECT w.machine_id, w.process
    FROM work w JOIN sessions s ON s.session_id = w.session_id
    WHERE s.deadline > now()
    UNION ALL
    SELECT b.machine_id, b.process
    FROM work_backoff b
    WHERE b.backoff_until > now();
