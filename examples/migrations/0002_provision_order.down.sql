DROP INDEX IF EXISTS machines_created_at;
