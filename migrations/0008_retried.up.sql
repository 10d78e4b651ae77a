-- An operator's retry (bmdb-host retry, bmdb.retry) ends a pair's backoff
-- now and is recorded in the machine's history as Retried, with the reason.
ALTER TABLE work_history DROP CONSTRAINT work_history_event;
ALTER TABLE work_history ADD CONSTRAINT work_history_event CHECK (event IN
    ('Started', 'Finished', 'Failed', 'Canceled', 'Abandoned', 'Held', 'Unheld', 'Retried'));
