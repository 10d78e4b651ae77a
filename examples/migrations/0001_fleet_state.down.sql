DROP TABLE machine_failures;
DROP TABLE machine_provided;
