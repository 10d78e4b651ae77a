DELETE FROM work_history WHERE event = 'Retried';
ALTER TABLE work_history DROP CONSTRAINT work_history_event;
ALTER TABLE work_history ADD CONSTRAINT work_history_event CHECK (event IN
    ('Started', 'Finished', 'Failed', 'Canceled', 'Abandoned', 'Held', 'Unheld'));
