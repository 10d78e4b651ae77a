DROP VIEW work_blocked;
CREATE VIEW work_blocked AS
    SELECT w.machine_id, w.process
    FROM work w JOIN sessions s ON s.session_id = w.session_id
    WHERE s.deadline > now()
    UNION ALL
    SELECT b.machine_id, b.process
    FROM work_backoff b
    WHERE b.backoff_until > now();
DROP TABLE machine_holds;
DROP TABLE processes;
DELETE FROM work_history WHERE event IN ('Held', 'Unheld') OR session_id IS NULL;
ALTER TABLE work_history DROP CONSTRAINT work_history_event;
ALTER TABLE work_history ADD CONSTRAINT work_history_event_check CHECK (event IN
    ('Started', 'Finished', 'Failed', 'Canceled', 'Abandoned'));
ALTER TABLE work_history ALTER COLUMN session_id SET NOT NULL;
ALTER TABLE work_history DROP COLUMN token;
ALTER TABLE work DROP COLUMN backoff_exponent;
ALTER TABLE work DROP COLUMN backoff_maximum;
ALTER TABLE work DROP COLUMN backoff_initial;
ALTER TABLE work DROP COLUMN timeout_seconds;
ALTER TABLE work DROP COLUMN deadline;
ALTER TABLE work DROP COLUMN token;
