DROP TABLE loop_history;
DROP TABLE loops;
