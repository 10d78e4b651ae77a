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
