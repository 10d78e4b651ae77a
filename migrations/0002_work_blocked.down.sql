DROP VIEW work_blocked;
