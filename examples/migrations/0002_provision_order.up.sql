-- The provisioner takes new machines oldest first (ORDER BY created_at
-- LIMIT n). Without an index on created_at every claim sorts the whole
-- fleet: about 190 ms per select at a million machines, against under a
-- millisecond walking this index and skipping the provided ones.
CREATE INDEX IF NOT EXISTS machines_created_at ON machines (created_at);
