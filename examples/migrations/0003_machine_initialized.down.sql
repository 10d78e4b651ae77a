DROP TABLE machine_initialized;
