DROP INDEX work_history_age;
