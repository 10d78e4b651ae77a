-- Pruning walks work_history oldest first, by (occurred_at, history_id):
-- each batch is one range of this index after the last one's end, so a
-- batch reads only old rows, never the recent ones claims write.
CREATE INDEX work_history_age ON work_history (occurred_at, history_id);
