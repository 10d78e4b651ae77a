DROP TABLE work_backoff;
DROP TABLE work_history;
DROP TABLE work;
DROP TABLE sessions;
DROP TABLE machines;
