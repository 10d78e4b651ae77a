ALTER TABLE work_history ALTER COLUMN occurred_at SET DEFAULT now();
