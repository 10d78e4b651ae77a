/* migrate.h -- the schema migrations in migrations/, embedded in the binary.
 *
 * Applied versions are recorded in schema_migrations with a checksum of
 * their .up.sql; a recorded checksum that no longer matches the file stops
 * the host. Hosts that start together serialize on one lock row, so each
 * migration runs once. Only SQL that PostgreSQL and CockroachDB share. */
#ifndef BMDB_MIGRATE_H
#define BMDB_MIGRATE_H

#include <stdio.h>
#include <stddef.h>
#include <libpq-fe.h>

typedef struct migration {
    int version;        /* NNNN of NNNN_name.up.sql */
    const char *name;   /* "0001_init" */
    const char *up;     /* SQL text */
    const char *down;
} migration;

/* Generated from migrations/ at build time (build/embedded.c). */
extern const migration bmdb_migrations[];
extern const int bmdb_migrations_count;

/* Applies every pending migration; refuses (-1, err) on a changed file.
 * *applied gets the number applied (may be NULL). */
int migrate_up(PGconn *c, int *applied, char *err, size_t errlen);
/* Only checks that every applied migration matches its file. */
int migrate_verify(PGconn *c, char *err, size_t errlen);
/* Rolls back the last n applied migrations, newest first. */
int migrate_down(PGconn *c, int n, char *err, size_t errlen);
/* Prints one line per known or applied migration. */
int migrate_status(PGconn *c, FILE *out, char *err, size_t errlen);

#endif
