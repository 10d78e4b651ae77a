/* bootstrap.h -- the start-up sequence the binary and the specs share.
 *
 *   database (a DSN, or the embedded default) -> pool, connected once so
 *   an unreachable server is reported at start -> schema (migrate or
 *   verify; the core's migrations, then the operator's) -> session and
 *   heartbeat
 *
 * main.c runs it for `bmdb-host SCRIPT`, core.open{} (lboot.c) for busted
 * and bmdb.testing, so both meet the same database in the same state. */
#ifndef BMDB_BOOTSTRAP_H
#define BMDB_BOOTSTRAP_H

#include <stddef.h>

#include "embedded.h"
#include "pool.h"

typedef struct host_db {
    embedded *emb;   /* NULL with a DSN */
    char *conninfo;  /* never logged */
    pool *pool;
} host_db;

/* dsn (NULL or "": the embedded database in data_dir) with a pool of
 * pool_size, connected once. 0, or -1 with err; *db is then safe to pass
 * to bootstrap_close. */
int bootstrap_database(const char *dsn, const char *data_dir, int pool_size, host_db *db, char *err,
                       size_t errlen);
void bootstrap_close(host_db *db);

enum { SCHEMA_MIGRATE, SCHEMA_VERIFY };
/* Applies pending migrations (SCHEMA_MIGRATE) or only checks that none is
 * pending and none changed (SCHEMA_VERIFY): the core's, then those in
 * migrations_dir (NULL: none). 0, or -1 with err. */
int bootstrap_schema(pool *p, int mode, const char *migrations_dir, char *err, size_t errlen);

/* Whether the server has room for a pool of pool_size beside the
 * connections open now, and some left for an operator: warns once if not
 * (connroom.h). Returns 1 when it warned. */
int bootstrap_room(pool *p, int slots, int pool_size);

/* Creates the first session and starts the heartbeat (session.h), with
 * the work module's housekeeping. 0, or -1 with err. */
int bootstrap_session(pool *p, const char *component, int interval_s, char *err, size_t errlen);

#endif
