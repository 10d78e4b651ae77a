/* migrate.c -- the schema migrations: the core's, embedded in the binary,
 * then the operator's own (--migrations DIR).
 *
 * Two sets, recorded the same way in two tables of the same shape, so
 * their version numbers never collide: the core's in schema_migrations,
 * the operator's in operator_migrations. Applied versions live there with
 * an FNV-1a checksum of their .up.sql. Hosts that start together serialize on the one row of
 * schema_migrations_lock: each migration runs in its own transaction that
 * first locks that row FOR UPDATE, then re-reads what is applied, so a
 * migration another host applied while we waited is skipped, not rerun.
 * That row lock replaces advisory locks, which CockroachDB lacks. */
#include "migrate.h"

#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hash.h"
#include "lifecycle.h"
#include "log.h"
#include "pqerr.h"
#include "tx.h"

static void checksum(const char *sql, char out[32]) {
    snprintf(out, 32, "fnv1a64:%016llx", (unsigned long long)fnv1a64(sql));
}

/* One set of migrations and the table that records it. table is one of
 * two constants, never a value from outside. */
typedef struct mset {
    const char *table;  /* "schema_migrations" or "operator_migrations" */
    const char *label;  /* for messages: "" or "operator " */
    const migration *list;
    int n;
} mset;

/* Core migrations that no longer ship. 0003 created the examples' fleet
 * tables (machine_provided, machine_failures); they moved out of the core
 * schema into examples/migrations. A database that applied 0003 keeps its
 * record and its tables (with whatever rows operators put there): nothing
 * drops them, and the examples' migration adopts them (CREATE TABLE IF NOT
 * EXISTS). A new database never gets them from the core. */
static const struct { int version; const char *name; } retired[] = {{3, "0003_fleet_state"}};

static const char *retired_name(int version) {
    for (size_t i = 0; i < sizeof retired / sizeof *retired; i++)
        if (retired[i].version == version) return retired[i].name;
    return NULL;
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
    char why[1024];
    pq_error_text(c, r, why, sizeof why);
    if (state) snprintf(state, 6, "%s", sqlstate_of(r));
    snprintf(err, errlen, "%s: %s", what, why);
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
        "INSERT INTO schema_migrations_lock (id) VALUES (1) ON CONFLICT (id) DO NOTHING;"
        "CREATE TABLE IF NOT EXISTS operator_migrations ("
        " version INT8 PRIMARY KEY, name TEXT NOT NULL, checksum TEXT NOT NULL,"
        " applied_at TIMESTAMPTZ NOT NULL DEFAULT now());";
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
static applied *read_applied(PGconn *c, const mset *set, int *n, char *err, size_t errlen) {
    PGresult *r;
    char sql[160], what[80];
    snprintf(sql, sizeof sql, "SELECT version, name, checksum, applied_at::TEXT FROM %s ORDER BY version",
             set->table);
    snprintf(what, sizeof what, "cannot read %s", set->table);
    if (exec_ok(c, sql, 0, NULL, &r, what, err, errlen, NULL) < 0) return NULL;
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

static const migration *known(const mset *set, int version) {
    for (int i = 0; i < set->n; i++)
        if (set->list[i].version == version) return &set->list[i];
    return NULL;
}

static const applied *find_applied(const applied *a, int n, int version) {
    for (int i = 0; i < n; i++)
        if (a[i].version == version) return &a[i];
    return NULL;
}

/* Every applied migration this binary knows must match its file. */
static int check_checksums(const mset *set, const applied *a, int n, char *err, size_t errlen) {
    for (int i = 0; i < n; i++) {
        const migration *m = known(set, a[i].version);
        if (!m && set->list == bmdb_migrations && retired_name(a[i].version)) continue;
        if (!m) {
            char v[16];
            snprintf(v, sizeof v, "%d", a[i].version);
            log_kv(LOG_WARN, *set->label ? "database has an operator migration this host was not given"
                                         : "database has a migration this host does not know",
                   "version", v, "name", a[i].name, NULL);
            continue;
        }
        char sum[32];
        checksum(m->up, sum);
        if (strcmp(sum, a[i].checksum) != 0) {
            snprintf(err, errlen,
                     "%smigration %s was changed after it was applied (recorded checksum %s, file has %s); "
                     "restore the file or add a new migration",
                     set->label, m->name, a[i].checksum, sum);
            return -1;
        }
    }
    return 0;
}

/* One migration in its own transaction, serialized by the lock row. 1 when
 * applied, 0 when another host got there first, -1 on error. */
static int apply_one(PGconn *c, const mset *set, const migration *m, char *err, size_t errlen) {
    char what[160], state[6] = "", version[16], sum[32], check[128], record[160];
    snprintf(what, sizeof what, "%smigration %s failed", set->label, m->name);
    snprintf(check, sizeof check, "SELECT 1 FROM %s WHERE version = $1", set->table);
    snprintf(record, sizeof record, "INSERT INTO %s (version, name, checksum) VALUES ($1, $2, $3)", set->table);
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
        if (!rc) rc = exec_ok(c, check, 1, vp, &r, what, err, errlen, state);
        if (!rc && PQntuples(r) > 0) {
            PQclear(r);
            rollback(c);
            return 0;
        }
        PQclear(r);
        if (!rc) rc = exec_ok(c, m->up, 0, NULL, NULL, what, err, errlen, state);
        if (!rc) rc = exec_ok(c, record, 3, ip, NULL, what, err, errlen, state);
        if (!rc) rc = exec_ok(c, "COMMIT", 0, NULL, NULL, what, err, errlen, state);
        if (!rc) {
            log_kv(LOG_INFO, *set->label ? "operator migration applied" : "migration applied", "migration",
                   m->name, NULL);
            return 1;
        }
        rollback(c);
        if (strcmp(state, "40001") != 0 || attempt >= 20) return -1;
        mono_sleep(tx_retry_delay(attempt % 8 + 1));
    }
}

/* ---- the operator's migrations (--migrations DIR) --------------------------- */

static void free_list(migration *list, int n) {
    for (int i = 0; i < n; i++) {
        free((char *)list[i].name);
        free((char *)list[i].up);
        free((char *)list[i].down);
    }
    free(list);
}

/* The file at path, or NULL with err set; with missing_ok, a file that
 * does not exist is NULL with err left alone. */
static char *slurp(const char *path, int missing_ok, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f && missing_ok && errno == ENOENT) return NULL;
    if (!f) {
        snprintf(err, errlen, "cannot read %s: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    for (size_t got; buf && (got = fread(buf + n, 1, cap - n - 1, f)) > 0;) {
        n += got;
        if (n + 1 == cap) buf = realloc(buf, cap *= 2);
    }
    fclose(f);
    if (buf) buf[n] = '\0';
    return buf;
}

static int by_version(const void *a, const void *b) {
    return ((const migration *)a)->version - ((const migration *)b)->version;
}

/* NNNN_name.up.sql with its NNNN_name.down.sql, as migrations/ holds them.
 * Anything else in dir is ignored; a malformed name or a version used
 * twice is refused, naming the file. A missing .down.sql is allowed (many
 * operators' migrations are one-way): only rolling that one back is
 * refused (down_set). */
static int load_dir(const char *dir, mset *set, char *err, size_t errlen) {
    set->table = "operator_migrations";
    set->label = "operator ";
    set->list = NULL;
    set->n = 0;
    DIR *d = opendir(dir);
    if (!d) {
        snprintf(err, errlen, "--migrations %s: %s", dir, strerror(errno));
        return -1;
    }
    migration *list = NULL;
    int n = 0, rc = 0;
    for (struct dirent *de; rc == 0 && (de = readdir(d));) {
        size_t len = strlen(de->d_name);
        if (len < 8 || strcmp(de->d_name + len - 7, ".up.sql") != 0) continue;
        char name[256];
        snprintf(name, sizeof name, "%.*s", (int)(len - 7), de->d_name);
        int ok = strlen(name) > 5 && name[4] == '_';
        for (int i = 0; ok && name[i]; i++)
            ok = i < 4 ? (name[i] >= '0' && name[i] <= '9')
                       : (name[i] == '_' || (name[i] >= 'a' && name[i] <= 'z') ||
                          (name[i] >= 'A' && name[i] <= 'Z') || (name[i] >= '0' && name[i] <= '9'));
        if (!ok) {
            snprintf(err, errlen, "--migrations %s: %s: expected NNNN_name.up.sql", dir, de->d_name);
            rc = -1;
            break;
        }
        char path[4096];
        migration m = {atoi(name), strdup(name), NULL, NULL};
        snprintf(path, sizeof path, "%s/%s.up.sql", dir, name);
        m.up = slurp(path, 0, err, errlen);
        snprintf(path, sizeof path, "%s/%s.down.sql", dir, name);
        int down_read = 1;
        if (m.up) {
            errno = 0;
            m.down = slurp(path, 1, err, errlen);
            down_read = m.down || errno == ENOENT;
        }
        list = realloc(list, sizeof *list * (size_t)(n + 1));
        list[n++] = m;
        if (!m.up || !down_read) rc = -1;
    }
    closedir(d);
    if (rc == 0) qsort(list, (size_t)n, sizeof *list, by_version);
    for (int i = 1; rc == 0 && i < n; i++)
        if (list[i].version == list[i - 1].version) {
            snprintf(err, errlen, "--migrations %s: %s and %s have the same version", dir, list[i - 1].name,
                     list[i].name);
            rc = -1;
        }
    if (rc < 0) {
        free_list(list, n);
        return -1;
    }
    set->list = list;
    set->n = n;
    return 0;
}

static mset core_set(void) { return (mset){"schema_migrations", "", bmdb_migrations, bmdb_migrations_count}; }

/* ---- the commands ------------------------------------------------------------ */

static int up_set(PGconn *c, const mset *set, int *napplied, char *err, size_t errlen) {
    int n = 0;
    applied *a = read_applied(c, set, &n, err, errlen);
    if (!a) return -1;
    int rc = check_checksums(set, a, n, err, errlen);
    for (int i = 0; rc == 0 && i < set->n; i++) {
        if (find_applied(a, n, set->list[i].version)) continue;
        int r = apply_one(c, set, &set->list[i], err, errlen);
        if (r < 0) rc = -1;
        else if (napplied) *napplied += r;
    }
    free(a);
    return rc;
}

int migrate_up(PGconn *c, const char *dir, int *napplied, char *err, size_t errlen) {
    if (napplied) *napplied = 0;
    mset core = core_set(), ops = {0};
    if (dir && load_dir(dir, &ops, err, errlen) < 0) return -1;
    int rc = bootstrap(c, err, errlen);
    if (rc == 0) rc = up_set(c, &core, napplied, err, errlen);
    if (rc == 0 && dir) rc = up_set(c, &ops, napplied, err, errlen);
    free_list((migration *)ops.list, ops.n);
    return rc;
}

static int verify_set(PGconn *c, const mset *set, int *pending, char *err, size_t errlen) {
    int n = 0;
    applied *a = read_applied(c, set, &n, err, errlen);
    if (!a) return -1;
    int rc = check_checksums(set, a, n, err, errlen);
    for (int i = 0; i < set->n; i++)
        if (!find_applied(a, n, set->list[i].version)) (*pending)++;
    free(a);
    return rc;
}

static int table_exists(PGconn *c, const char *table, int *exists, char *err, size_t errlen) {
    PGresult *r;
    const char *params[] = {table};
    if (exec_ok(c, "SELECT 1 FROM information_schema.tables WHERE table_name = $1", 1, params, &r,
                "cannot read the schema", err, errlen, NULL) < 0)
        return -1;
    *exists = PQntuples(r) > 0;
    PQclear(r);
    return 0;
}

int migrate_verify(PGconn *c, const char *dir, char *err, size_t errlen) {
    int exists = 0, ops_exist = 0;
    if (table_exists(c, "schema_migrations", &exists, err, errlen) < 0) return -1;
    if (!exists) {
        snprintf(err, errlen, "database has no schema; run bmdb-host migrate up");
        return -1;
    }
    mset core = core_set(), ops = {0};
    if (dir && load_dir(dir, &ops, err, errlen) < 0) return -1;
    int pending = 0;
    int rc = verify_set(c, &core, &pending, err, errlen);
    if (rc == 0 && dir) rc = table_exists(c, "operator_migrations", &ops_exist, err, errlen);
    if (rc == 0 && dir) {
        if (ops_exist) rc = verify_set(c, &ops, &pending, err, errlen);
        else pending += ops.n; /* recorded by a host older than --migrations */
    }
    free_list((migration *)ops.list, ops.n);
    if (rc == 0 && pending) {
        snprintf(err, errlen, "database schema is behind (%d pending migration%s); run bmdb-host migrate up",
                 pending, pending == 1 ? "" : "s");
        rc = -1;
    }
    return rc;
}

static int down_set(PGconn *c, const mset *set, int count, char *err, size_t errlen) {
    int n = 0;
    applied *a = read_applied(c, set, &n, err, errlen);
    if (!a) return -1;
    int rc = 0;
    if (count < 1 || count > n) {
        snprintf(err, errlen, "cannot roll back %d %smigration%s: only %d applied", count, set->label,
                 count == 1 ? "" : "s", n);
        rc = -1;
    }
    /* One with no down file stops the whole roll-back before any of it runs. */
    for (int i = n - 1; rc == 0 && i >= n - count; i--) {
        const migration *m = known(set, a[i].version);
        if (m && !m->down) {
            snprintf(err, errlen, "cannot roll back %smigration %d (%s): its down file, %s.down.sql, is missing "
                     "(the migration was applied from %s.up.sql alone)", set->label, a[i].version, m->name,
                     m->name, m->name);
            rc = -1;
        }
    }
    char forget[128];
    snprintf(forget, sizeof forget, "DELETE FROM %s WHERE version = $1", set->table);
    for (int i = n - 1; rc == 0 && i >= n - count; i--) {
        const migration *m = known(set, a[i].version);
        if (!m) {
            const char *why = set->list == bmdb_migrations && retired_name(a[i].version)
                                  ? "it is retired (its tables now belong to the examples' migrations)"
                                  : "this host does not know it";
            snprintf(err, errlen, "cannot roll back %smigration %d (%s): %s", set->label, a[i].version,
                     a[i].name, why);
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
        if (!rc) rc = exec_ok(c, forget, 1, vp, NULL, what, err, errlen, NULL);
        if (!rc) rc = exec_ok(c, "COMMIT", 0, NULL, NULL, what, err, errlen, NULL);
        if (rc) rollback(c);
        else log_kv(LOG_INFO, "migration rolled back", "migration", m->name, NULL);
    }
    free(a);
    return rc;
}

int migrate_down(PGconn *c, const char *dir, int count, char *err, size_t errlen) {
    mset core = core_set(), ops = {0};
    if (dir && load_dir(dir, &ops, err, errlen) < 0) return -1;
    int rc = bootstrap(c, err, errlen);
    if (rc == 0) rc = down_set(c, dir ? &ops : &core, count, err, errlen);
    free_list((migration *)ops.list, ops.n);
    return rc;
}

static int status_set(PGconn *c, const mset *set, FILE *out, char *err, size_t errlen) {
    int n = 0;
    applied *a = read_applied(c, set, &n, err, errlen);
    if (!a) return -1;
    for (int i = 0; i < set->n; i++) {
        const migration *m = &set->list[i];
        const applied *ap = find_applied(a, n, m->version);
        char sum[32];
        checksum(m->up, sum);
        if (!ap) fprintf(out, "%s%-24s pending\n", set->label, m->name);
        else fprintf(out, "%s%-24s applied %s%s\n", set->label, m->name, ap->applied_at,
                     strcmp(sum, ap->checksum) ? "  CHANGED since applied" : "");
    }
    for (int i = 0; i < n; i++) {
        if (known(set, a[i].version)) continue;
        if (set->list == bmdb_migrations && retired_name(a[i].version))
            fprintf(out, "%-24s applied %s, retired: its tables are the examples' now (left in place)\n",
                    a[i].name, a[i].applied_at);
        else
            fprintf(out, "%s%-24s applied %s, unknown to this host\n", set->label, a[i].name, a[i].applied_at);
    }
    free(a);
    return 0;
}

int migrate_status(PGconn *c, const char *dir, FILE *out, char *err, size_t errlen) {
    mset core = core_set(), ops = {0};
    if (dir && load_dir(dir, &ops, err, errlen) < 0) return -1;
    int rc = bootstrap(c, err, errlen);
    if (rc == 0) rc = status_set(c, &core, out, err, errlen);
    if (rc == 0 && dir) rc = status_set(c, &ops, out, err, errlen);
    free_list((migration *)ops.list, ops.n);
    return rc;
}
