-- work_blocked no longer lists a paused process's machines. That branch
-- was every machine joined to each paused process, and PostgreSQL counts
-- a process that is not paused as one row all the same: at a million
-- machines it expected a million rows from the view and planned a
-- select's NOT EXISTS against it as a hash anti join sized for them,
-- several times slower than the per-candidate primary-key lookups it
-- chooses at a thousand. A pause is a fact about a process, not about a
-- machine: the claim refuses a paused process whatever select returns
-- (host/work.c), and the host then logs the pause and stays idle. Each
-- remaining branch resolves by primary key for a given (machine, process).
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
    SELECT h.machine_id, p.process
    FROM machine_holds h CROSS JOIN processes p;
