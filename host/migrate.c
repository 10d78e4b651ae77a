/* migrate.c -- the schema migrations in migrations/, embedded in the binary.
 *
 * Applied versions live in schema_migrations with an FNV-1a checksum of
 * their .up.sql. Hosts that start together serialize on the one row of
 * schema_migrations_lock: each migration runs in its own transaction that
 * first locks that row FOR UPDATE, then re-reads what is applied, so a
 * migration another host applied while we waited is skipped, not rerun.
 * That row lock replaces advisory locks, which CockroachDB lacks. */
#include "migrate.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lifecycle.h"
#include "log.h"
#include "tx.h"

static void checksum(const char *sql, char out[32]) {
    uint64_t h = 1469598103934665603ULL;
    for (const unsigned char *p = (const unsigned char *)sql; *p; p++) {
        h ^= *p;
        h *= 1099511628211ULL;
    }
    snprintf(out, 32, "fnv1a64:%016llx", (unsigned long long)h);
}

static const char *sqlstate_of(const PGresult *r) {
    const char *s = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    return s ? s : "";
}

/* Runs sql; on failure fills err with "what: sqlstate message". */
static int exec_ok(PGconn *c, const char *sql, int n, const char *const *params, PGresult **out,
                   const char *what, char *err, size_t errlen, char state[6]) {
    PGresult *r = n ? PQexecParams(c, sql, n, NULL, params, NULL, NULL, 0) : PQexec(c, sql);
    ExecStatusType st = PQresultStatus(r);
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) {
        if (out) *out = r;
        else PQclear(r);
        return 0;
    }
    tx_error e;
    tx_error_from_result(&e, c, r);
    if (state) snprintf(state, 6, "%s", sqlstate_of(r));
    snprintf(err, errlen, "%s: %s%s%s", what, e.sqlstate, *e.sqlstate ? " " : "", e.message);
    PQclear(r);
    return -1;
}

static void rollback(PGconn *c) {
    if (PQtransactionStatus(c) != PQTRANS_IDLE) PQclear(PQexec(c, "ROLLBACK"));
}

/* Races between hosts creating the bookkeeping tables surface as unique or
 * duplicate-object errors (PostgreSQL) or retry errors (CockroachDB). */
static int bootstrap_race(const char *state) {
    return !strcmp(state, "23505") || !strcmp(state, "42P07") || !strcmp(state, "40001") ||
           !strcmp(state, "XX000") || !strcmp(state, "42710");
}

static int bootstrap(PGconn *c, char *err, size_t errlen) {
    static const char sql[] =
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INT8 PRIMARY KEY, name TEXT NOT NULL, checksum TEXT NOT NULL,"
        " applied_at TIMESTAMPTZ NOT NULL DEFAULT now());"
        "CREATE TABLE IF NOT EXISTS schema_migrations_lock (id INT8 PRIMARY KEY CHECK (id = 1));"
        "INSERT INTO schema_migrations_lock (id) VALUES (1) ON CONFLICT (id) DO NOTHING;";
    char state[6] = "";
    for (int attempt = 1;; attempt++) {
        if (exec_ok(c, sql, 0, NULL, NULL, "cannot create schema_migrations", err, errlen, state) == 0)
            return 0;
        rollback(c);
        if (!bootstrap_race(state) || attempt >= 20) return -1;
        mono_sleep(tx_retry_delay(attempt % 8 + 1) * 4);
    }
}

typedef struct { int version; char name[128]; char checksum[32]; char applied_at[64]; } applied;

/* Reads schema_migrations, oldest first; *n gets the count. NULL on error. */
static applied *read_applied(PGconn *c, int *n, char *err, size_t errlen) {
    PGresult *r;
    if (exec_ok(c, "SELECT version, name, checksum, applied_at::TEXT FROM schema_migrations ORDER BY version",
                0, NULL, &r, "cannot read schema_migrations", err, errlen, NULL) < 0)
        return NULL;
    *n = PQntuples(r);
    applied *a = calloc((size_t)*n + 1, sizeof *a);
    for (int i = 0; i < *n; i++) {
        a[i].version = atoi(PQgetvalue(r, i, 0));
        snprintf(a[i].name, sizeof a[i].name, "%s", PQgetvalue(r, i, 1));
        snprintf(a[i].checksum, sizeof a[i].checksum, "%s", PQgetvalue(r, i, 2));
        snprintf(a[i].applied_at, sizeof a[i].applied_at, "%s", PQgetvalue(r, i, 3));
    }
    PQclear(r);
    return a;
}

static const migration *known(int version) {
    for (int i = 0; i < bmdb_migrations_count; i++)
        if (bmdb_migrations[i].version == version) return &bmdb_migrations[i];
    return NULL;
}

static const applied *find_applied(const applied *a, int n, int version) {
    for (int i = 0; i < n; i++)
        if (a[i].version == version) return &a[i];
    return NULL;
}

/* Every applied migration this binary knows must match its file. */
static int check_checksums(const applied *a, int n, char *err, size_t errlen) {
    for (int i = 0; i < n; i++) {
        const migration *m = known(a[i].version);
        if (!m) {
            char v[16];
            snprintf(v, sizeof v, "%d", a[i].version);
            log_kv(LOG_WARN, "database has a migration this host does not know", "version", v,
                   "name", a[i].name, NULL);
            continue;
        }
        char sum[32];
        checksum(m->up, sum);
        if (strcmp(sum, a[i].checksum) != 0) {
            snprintf(err, errlen,
                     "migration %s was changed after it was applied (recorded checksum %s, file has %s); "
                     "restore the file or add a new migration",
                     m->name, a[i].checksum, sum);
            return -1;
        }
    }
    return 0;
}

/* One migration in its own transaction, serialized by the lock row. 1 when
 * applied, 0 when another host got there first, -1 on error. */
static int apply_one(PGconn *c, const migration *m, char *err, size_t errlen) {
    char what[160], state[6] = "", version[16], sum[32];
    snprintf(what, sizeof what, "migration %s failed", m->name);
    snprintf(version, sizeof version, "%d", m->version);
    checksum(m->up, sum);
    const char *vp[] = {version};
    const char *ip[] = {version, m->name, sum};
    for (int attempt = 1;; attempt++) {
        PGresult *r = NULL;
        /* READ COMMITTED is enough here: the row lock orders the hosts, and
         * the re-read after it sees whatever the previous holder committed. */
        int rc = exec_ok(c, "BEGIN", 0, NULL, NULL, what, err, errlen, state);
        if (!rc) rc = exec_ok(c, "SELECT id FROM schema_migrations_lock WHERE id = 1 FOR UPDATE", 0, NULL,
                              NULL, what, err, errlen, state);
        if (!rc) rc = exec_ok(c, "SELECT 1 FROM schema_migrations WHERE version = $1", 1, vp, &r, what,
                              err, errlen, state);
        if (!rc && PQntuples(r) > 0) {
            PQclear(r);
            rollback(c);
            return 0;
        }
        PQclear(r);
        if (!rc) rc = exec_ok(c, m->up, 0, NULL, NULL, what, err, errlen, state);
        if (!rc) rc = exec_ok(c, "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                              3, ip, NULL, what, err, errlen, state);
        if (!rc) rc = exec_ok(c, "COMMIT", 0, NULL, NULL, what, err, errlen, state);
        if (!rc) {
            log_kv(LOG_INFO, "migration applied", "migration", m->name, NULL);
            return 1;
        }
        rollback(c);
        if (strcmp(state, "40001") != 0 || attempt >= 20) return -1;
        mono_sleep(tx_retry_delay(attempt % 8 + 1));
    }
}

int migrate_up(PGconn *c, int *napplied, char *err, size_t errlen) {
    if (napplied) *napplied = 0;
    if (bootstrap(c, err, errlen) < 0) return -1;
    int n = 0;
    applied *a = read_applied(c, &n, err, errlen);
    if (!a) return -1;
    int rc = check_checksums(a, n, err, errlen);
    for (int i = 0; rc == 0 && i < bmdb_migrations_count; i++) {
        if (find_applied(a, n, bmdb_migrations[i].version)) continue;
        int r = apply_one(c, &bmdb_migrations[i], err, errlen);
        if (r < 0) rc = -1;
        else if (napplied) *napplied += r;
    }
    free(a);
    return rc;
}

int migrate_verify(PGconn *c, char *err, size_t errlen) {
    PGresult *r;
    if (exec_ok(c, "SELECT 1 FROM information_schema.tables WHERE table_name = 'schema_migrations'", 0,
                NULL, &r, "cannot read the schema", err, errlen, NULL) < 0)
        return -1;
    int exists = PQntuples(r) > 0;
    PQclear(r);
    if (!exists) {
        snprintf(err, errlen, "database has no schema; run bmdb-host migrate up");
        return -1;
    }
    int n = 0, pending = 0;
    applied *a = read_applied(c, &n, err, errlen);
    if (!a) return -1;
    int rc = check_checksums(a, n, err, errlen);
    for (int i = 0; i < bmdb_migrations_count; i++)
        if (!find_applied(a, n, bmdb_migrations[i].version)) pending++;
    free(a);
    if (rc == 0 && pending) {
        snprintf(err, errlen, "database schema is behind (%d pending migration%s); run bmdb-host migrate up",
                 pending, pending == 1 ? "" : "s");
        rc = -1;
    }
    return rc;
}

int migrate_down(PGconn *c, int count, char *err, size_t errlen) {
    if (bootstrap(c, err, errlen) < 0) return -1;
    int n = 0;
    applied *a = read_applied(c, &n, err, errlen);
    if (!a) return -1;
    int rc = 0;
    if (count < 1 || count > n) {
        snprintf(err, errlen, "cannot roll back %d migration%s: only %d applied", count,
                 count == 1 ? "" : "s", n);
        rc = -1;
    }
    for (int i = n - 1; rc == 0 && i >= n - count; i--) {
        const migration *m = known(a[i].version);
        if (!m) {
            snprintf(err, errlen, "cannot roll back migration %d (%s): this host does not know it",
                     a[i].version, a[i].name);
            rc = -1;
            break;
        }
        char what[160], version[16];
        snprintf(what, sizeof what, "rolling back %s failed", m->name);
        snprintf(version, sizeof version, "%d", m->version);
        const char *vp[] = {version};
        rc = exec_ok(c, "BEGIN", 0, NULL, NULL, what, err, errlen, NULL);
        if (!rc) rc = exec_ok(c, "SELECT id FROM schema_migrations_lock WHERE id = 1 FOR UPDATE", 0, NULL,
                              NULL, what, err, errlen, NULL);
        if (!rc) rc = exec_ok(c, m->down, 0, NULL, NULL, what, err, errlen, NULL);
        if (!rc) rc = exec_ok(c, "DELETE FROM schema_migrations WHERE version = $1", 1, vp, NULL, what,
                              err, errlen, NULL);
        if (!rc) rc = exec_ok(c, "COMMIT", 0, NULL, NULL, what, err, errlen, NULL);
        if (rc) rollback(c);
        else log_kv(LOG_INFO, "migration rolled back", "migration", m->name, NULL);
    }
    free(a);
    return rc;
}

int migrate_status(PGconn *c, FILE *out, char *err, size_t errlen) {
    if (bootstrap(c, err, errlen) < 0) return -1;
    int n = 0;
    applied *a = read_applied(c, &n, err, errlen);
    if (!a) return -1;
    for (int i = 0; i < bmdb_migrations_count; i++) {
        const migration *m = &bmdb_migrations[i];
        const applied *ap = find_applied(a, n, m->version);
        char sum[32];
        checksum(m->up, sum);
        if (!ap) fprintf(out, "%-24s pending\n", m->name);
        else fprintf(out, "%-24s applied %s%s\n", m->name, ap->applied_at,
                     strcmp(sum, ap->checksum) ? "  CHANGED since applied" : "");
    }
    for (int i = 0; i < n; i++)
        if (!known(a[i].version)) fprintf(out, "%-24s applied %s, unknown to this host\n", a[i].name, a[i].applied_at);
    free(a);
    return 0;
}
