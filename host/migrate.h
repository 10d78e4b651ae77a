/* migrate.h -- the schema migrations: the core's (migrations/, embedded in
 * the binary), then the operator's own (a directory given with
 * --migrations, laid out the same way: NNNN_name.up.sql and .down.sql).
 *
 * Applied versions are recorded with a checksum of their .up.sql, the
 * core's in schema_migrations, the operator's in operator_migrations; a
 * recorded checksum that no longer matches the file stops the host. Hosts that start together serialize on one lock row, so each
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

/* Generated from migrations/ at build time (build/bundle.c). */
extern const migration bmdb_migrations[];
extern const int bmdb_migrations_count;

/* dir is the operator's migrations directory, or NULL for none. */

/* Applies every pending migration, the core's first; refuses (-1, err) on
 * a changed file. *applied gets the number applied (may be NULL). */
int migrate_up(PGconn *c, const char *dir, int *applied, char *err, size_t errlen);
/* Only checks: every applied migration matches its file, none pending. */
int migrate_verify(PGconn *c, const char *dir, char *err, size_t errlen);
/* Rolls back the last n applied migrations, newest first: the operator's
 * when dir is given, else the core's. */
int migrate_down(PGconn *c, const char *dir, int n, char *err, size_t errlen);
/* Prints one line per known or applied migration. */
int migrate_status(PGconn *c, const char *dir, FILE *out, char *err, size_t errlen);

#endif
