/* retry.c -- an operator's "try now" for pairs in backoff: one pair, or a
 * process's pairs that a cause and a time select, cleared in batches; the
 * command line that does it (bmdb-host retry). The SQL is shared with the
 * Lua API (lcontrol.c: bmdb.retry), each inside its caller's transaction.
 *
 * Clearing moves backoff_until to now and keeps attempts and last_seconds:
 * the claim reads backoff_until > now() (work.c), so the pair is free at
 * once, and a failure after it grows the period from where it was, which
 * is what a pair still broken should do. A pair's last failure is
 * backoff_until - last_seconds: both writers of a backoff (work.c) set
 * backoff_until to the failure's now() plus last_seconds. */
#include "retry.h"

#include <stdlib.h>
#include <string.h>

#include "lifecycle.h"
#include "session.h"
#include "work.h"

/* The history event of a cleared pair, from the rows of a CTE "cleared";
 * $R is the reason, $S the session (NULL from the command line). */
#define RECORD_SQL(r, s)                                                                          \
    "recorded AS (INSERT INTO work_history (machine_id, process, session_id, event, cause) "      \
    " SELECT machine_id, process, " s "::UUID, 'Retried', "                                      \
    " 'retried by an operator' || coalesce(': ' || " r "::TEXT, '') FROM cleared RETURNING 1) "

/* The pairs of filter $1 (process), $2 (cause substring), $3 (since). */
#define SELECT_SQL                                                                                \
    "SELECT machine_id, process FROM work_backoff WHERE process = $1 AND backoff_until > now() "  \
    " AND ($2::TEXT IS NULL OR strpos(cause, $2::TEXT) > 0) "                                     \
    " AND ($3::TIMESTAMPTZ IS NULL "                                                              \
    "  OR backoff_until - last_seconds * INTERVAL '1 second' >= $3::TIMESTAMPTZ)"

static const char *sess_of(tx *t) { return t->sess ? session_id(t->sess) : NULL; }

int retry_one(tx *t, const char *machine, const char *process, const char *reason, tx_error *e) {
    const char *p[] = {machine, process, reason, sess_of(t)};
    long n = tx_run(t,
                 "WITH cleared AS (UPDATE work_backoff SET backoff_until = now() "
                 " WHERE machine_id = $1 AND process = $2 AND backoff_until > now() "
                 " RETURNING machine_id, process), " RECORD_SQL("$3", "$4")
                 "SELECT 1 FROM cleared",
                 4, p, NULL, e);
    return n < 0 ? -1 : n > 0;
}

long retry_batch(tx *t, const retry_filter *f, long limit, const char *reason, tx_error *e) {
    char lim[32];
    snprintf(lim, sizeof lim, "%ld", limit);
    const char *p[] = {f->process, f->cause, f->since, lim, reason, sess_of(t)};
    /* The outer condition repeats the backoff test: a pair a claim or a
     * failure changed since the subquery read it is judged as it is now. */
    PGresult *r;
    long n = tx_run(t,
                 "WITH cleared AS (UPDATE work_backoff b SET backoff_until = now() "
                 " WHERE (b.machine_id, b.process) IN (" SELECT_SQL " LIMIT $4::INT8) "
                 " AND b.backoff_until > now() RETURNING b.machine_id, b.process), "
                 RECORD_SQL("$5", "$6") "SELECT count(*) FROM cleared",
                 6, p, &r, e);
    if (n < 0) return -1;
    long cleared = atol(PQgetvalue(r, 0, 0));
    PQclear(r);
    return cleared;
}

long retry_count(tx *t, const retry_filter *f, tx_error *e) {
    const char *p[] = {f->process, f->cause, f->since};
    PGresult *r;
    long n = tx_run(t, "SELECT count(*) FROM (" SELECT_SQL ") AS s", 3, p, &r, e);
    if (n < 0) return -1;
    long count = atol(PQgetvalue(r, 0, 0));
    PQclear(r);
    return count;
}

int retry_bad_since(const retry_filter *f, tx_error *e) {
    /* 22007 invalid_datetime_format, 22008 datetime_field_overflow: both
     * servers' answers to a text that is no timestamp. */
    if (!f->since || e->kind != TXE_SQL || strncmp(e->sqlstate, "2200", 4) != 0) return 0;
    snprintf(e->message, sizeof e->message, "--since is not a timestamp: %s (ISO 8601, e.g. "
             "2026-12-08T01:00:00Z)", f->since);
    return 1;
}

/* ---- the command line ------------------------------------------------------ */

#define RETRY_USAGE "retry: expected MACHINE PROCESS [--reason TEXT] or --process PROCESS " \
                    "[--cause TEXT] [--since TIME] [--dry-run] [--reason TEXT]"

int retry_parse(int argc, char **argv, retry_args *a, char *err, size_t errlen) {
    memset(a, 0, sizeof *a);
    static const char *const valued[] = {"--reason", "--process", "--cause", "--since"};
    const char **slot[] = {&a->reason, &a->f.process, &a->f.cause, &a->f.since};
    const char *pos[2];
    int npos = 0;
    for (int i = 0; i < argc; i++) {
        int k = -1;
        const char *v = NULL;
        for (int j = 0; j < 4 && k < 0; j++) {
            size_t len = strlen(valued[j]);
            if (strcmp(argv[i], valued[j]) == 0) {
                if (i + 1 >= argc) return snprintf(err, errlen, "retry: option %s needs a value", valued[j]), -1;
                k = j, v = argv[++i];
            } else if (strncmp(argv[i], valued[j], len) == 0 && argv[i][len] == '=') {
                k = j, v = argv[i] + len + 1;
            }
        }
        if (k >= 0) *slot[k] = v;
        else if (strcmp(argv[i], "--dry-run") == 0) a->dry_run = 1;
        else if (argv[i][0] == '-' && argv[i][1])
            return snprintf(err, errlen, "retry: unknown option '%s'", argv[i]), -1;
        else if (npos < 2) pos[npos++] = argv[i];
        else npos++;
    }
    if (a->f.process) { /* bulk */
        if (npos) return snprintf(err, errlen, "retry: --process takes no MACHINE PROCESS arguments"), -1;
    } else {
        if (a->f.cause || a->f.since || a->dry_run)
            return snprintf(err, errlen, "retry: --cause, --since and --dry-run need --process"), -1;
        if (npos != 2) return snprintf(err, errlen, "%s", RETRY_USAGE), -1;
        a->machine = pos[0];
        a->f.process = pos[1];
        if (!work_valid_uuid(a->machine))
            return snprintf(err, errlen, "retry: machine id is not a UUID: %s", a->machine), -1;
    }
    if (!work_valid_process(a->f.process))
        return snprintf(err, errlen, "retry: invalid process name '%s' (a letter, then letters, digits "
                        "or _; at most 63)", a->f.process), -1;
    if (a->f.since && !*a->f.since) return snprintf(err, errlen, "retry: --since needs a timestamp"), -1;
    return 0;
}

/* After a commit that cleared something: the process's idle slots, on
 * every host, look again. A server without notifications (CockroachDB)
 * refuses, and the slots find the pairs at their next poll. */
static void wake(pool *p, const char *process) {
    char err[256];
    PGconn *c = pool_get(p, POOL_WAIT_S, err, sizeof err);
    if (!c) return;
    const char *v[] = {process};
    PQclear(PQexecParams(c, "SELECT pg_notify('bmdb_wake', $1)", 1, NULL, v, NULL, NULL, 0));
    pool_put(p, c);
}

/* One transaction of the command: the pair, a batch, or the dry run's
 * count, retried on a serialization failure. n gets its answer. */
static int run_one_tx(pool *p, const retry_args *a, long *n, tx_error *e) {
    for (int attempt = 1;; attempt++) {
        tx t;
        long rc = -1;
        if (tx_begin(&t, p, NULL, e) == 0) {
            rc = a->machine ? retry_one(&t, a->machine, a->f.process, a->reason, e)
               : a->dry_run ? retry_count(&t, &a->f, e)
                            : retry_batch(&t, &a->f, RETRY_BATCH, a->reason, e);
            if (rc >= 0 && tx_commit(&t, e) < 0) rc = -1;
            if (rc < 0) tx_rollback(&t);
        }
        if (rc >= 0) return *n = rc, 0;
        /* 40001/40P01: a claim or a failure touched the same rows */
        int again = e->kind == TXE_SQL && (!strcmp(e->sqlstate, "40001") || !strcmp(e->sqlstate, "40P01"));
        double delay = again ? tx_retry_delay(attempt) : -1;
        if (delay < 0) return -1;
        mono_sleep(delay);
    }
}

int retry_run(pool *p, const retry_args *a, FILE *out, char *err, size_t errlen) {
    long total = 0, n = 0;
    tx_error e;
    do {
        if (run_one_tx(p, a, &n, &e) < 0) {
            int bad = retry_bad_since(&a->f, &e);
            snprintf(err, errlen, "retry: %s%s%s", bad ? "" : e.sqlstate, bad || !*e.sqlstate ? "" : " ", e.message);
            if (total) fprintf(out, "process %s: %ld pairs retried before the error\n", a->f.process, total);
            return bad ? -2 : -1;
        }
        total += n;
        if (n > 0 && !a->dry_run) wake(p, a->f.process);
        /* A batch that was full may have left more; a cleared pair is out
         * of the selection (its backoff_until is no longer ahead). */
    } while (!a->machine && !a->dry_run && n == RETRY_BATCH);
    if (a->machine)
        fprintf(out, "pair %s %s: %s\n", a->machine, a->f.process, n ? "retried" : "not in backoff, nothing retried");
    else
        fprintf(out, "process %s: %ld pair%s %s\n", a->f.process, total, total == 1 ? "" : "s",
                a->dry_run ? "would be retried (dry run)" : "retried");
    return a->machine ? n > 0 : 1;
}
