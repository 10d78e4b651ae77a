/* bootstrap.c -- the start-up sequence the binary and the specs share.
 *
 * See bootstrap.h. Each step reports its failure as one line naming what
 * is wrong; none prints, so main.c and core.open can each say it their
 * way (stderr and an exit status, or a raised error object). */
#include "bootstrap.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "connroom.h"
#include "migrate.h"
#include "session.h"
#include "work.h"

int bootstrap_database(const char *dsn, const char *data_dir, int pool_size, host_db *db, char *err,
                       size_t errlen) {
    memset(db, 0, sizeof *db);
    if (dsn && *dsn) {
        db->conninfo = strdup(dsn);
    } else {
        db->emb = embedded_open(data_dir, &db->conninfo, err, errlen);
        if (!db->emb) return -1;
    }
    db->pool = pool_create(db->conninfo, pool_size);
    if (!db->pool) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    /* Connect once now, so an unreachable server is reported at start. */
    PGconn *c = pool_get(db->pool, POOL_WAIT_S, err, errlen);
    if (!c) return -1;
    pool_put(db->pool, c);
    return 0;
}

void bootstrap_close(host_db *db) {
    if (db->pool) pool_destroy(db->pool);
    if (db->emb) embedded_close(db->emb);
    free(db->conninfo);
    memset(db, 0, sizeof *db);
}

int bootstrap_schema(pool *p, int mode, const char *migrations_dir, char *err, size_t errlen) {
    PGconn *c = pool_get(p, POOL_WAIT_S, err, errlen);
    if (!c) return -1;
    int rc = mode == SCHEMA_MIGRATE ? migrate_up(c, migrations_dir, NULL, err, errlen)
                                    : migrate_verify(c, migrations_dir, err, errlen);
    pool_put(p, c);
    return rc;
}

int bootstrap_room(pool *p, int slots, int pool_size) {
    char err[256];
    PGconn *c = pool_get(p, POOL_WAIT_S, err, sizeof err);
    if (!c) return 0; /* the slots will say why */
    int in_use, idle;
    pool_stats(p, &in_use, &idle);
    int warned = connroom_check(c, slots, pool_size, in_use + idle);
    pool_put(p, c);
    return warned;
}

/* "host:pid", what sessions.runtime_info says of this process. */
static void runtime_info(char *buf, size_t len) {
    char host[256] = "";
    gethostname(host, sizeof host - 1);
    snprintf(buf, len, "%s:%d", host, (int)getpid());
}

int bootstrap_session(pool *p, const char *component, int interval_s, char *err, size_t errlen) {
    char runtime[320];
    runtime_info(runtime, sizeof runtime);
    struct session_config cfg = {component, runtime, interval_s, &work_housekeeping};
    return sessions_start(p, &cfg, err, errlen);
}
