-- Events recorded in one transaction (a takeover's Abandoned, then the new
-- holder's Started) must keep their order: now() is the same for the whole
-- transaction, clock_timestamp() is not.
ALTER TABLE work_history ALTER COLUMN occurred_at SET DEFAULT clock_timestamp();
