/* prune.c -- history retention: old work_history and loop_history rows
 * deleted in short batches; the command line that runs them; the host's
 * --keep-history, which the retention loop reads (lua/bmdb/retention.lua).
 *
 * What is kept. The latest event of a (machine, process) that has a work
 * row or a work_backoff row stays whatever its age: it says why the pair
 * is held or waiting. Everything else older than the cutoff goes. Of
 * loop_history, everything older goes: a loop's state is its loops row.
 *
 * Why it is kept under concurrent claims and releases. Each batch is one
 * statement, so its protection test (work, work_backoff, a newer event of
 * the pair) and its delete see one snapshot. Every transaction that
 * creates a work or backoff row also writes an event of that pair in the
 * same commit (the claim's Started, the failure's Failed). So a lock or
 * backoff the snapshot cannot see yet comes with a newer event it cannot
 * see either: that event is not deleted (invisible rows are never
 * touched), and it, not the old one deleted, is the pair's latest. A lock
 * the snapshot sees but that is released meanwhile only keeps an event one
 * batch longer. History rows are never updated, so READ COMMITTED's
 * re-check of a changed row never arises.
 *
 * Why READ COMMITTED, and why it is safe here. Claims and finishes run
 * SERIALIZABLE; on PostgreSQL only serializable transactions take part in
 * the conflict tracking, so a READ COMMITTED prune reading work and
 * work_backoff can never make a claim fail with 40001. Claims only insert
 * history and never read it, so deleting old rows conflicts with nothing
 * they do. A prune only needs one consistent snapshot per statement, which
 * READ COMMITTED gives. (CockroachDB without READ COMMITTED enabled runs
 * it SERIALIZABLE: the batch stays short and retries itself.)
 *
 * Why batches over an index range. Each batch reads at most `limit` rows
 * of work_history_age (occurred_at, history_id) after the previous batch's
 * end, then of loop_history_age the same way: never the recent end of the
 * table, where claims insert, and never the same protected rows twice. Its
 * locks go at its commit; the command line and the retention loop pause
 * between batches. */
#include "prune.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "lifecycle.h"
#include "pqerr.h"
#include "tx.h"

#define PRUNE_PAUSE_S 0.02  /* between batches: claims get the server to themselves */
#define PRUNE_MAX_BATCH 100000

/* The rows this batch looks at: the next range of the age index. */
#define SCAN_WORK                                                                                   \
    "WITH scan AS (SELECT history_id, machine_id, process, occurred_at FROM work_history "          \
    " WHERE occurred_at < $1::TIMESTAMPTZ "
#define SCAN_LOOP \
    "WITH scan AS (SELECT history_id, occurred_at FROM loop_history WHERE occurred_at < $1::TIMESTAMPTZ "
#define SCAN_AFTER " AND (occurred_at, history_id) > ($3::TIMESTAMPTZ, $4::UUID) "
#define SCAN_END " ORDER BY occurred_at, history_id LIMIT $2::INT8), "
/* Those not protected: not the latest event of a pair in flight or in
 * backoff. "Latest" is the history's own order (occurred_at, history_id). */
#define VICTIMS_WORK                                                                                    \
    "victims AS (SELECT h.history_id FROM scan h WHERE NOT ("                                          \
    " (EXISTS (SELECT 1 FROM work w WHERE w.machine_id = h.machine_id AND w.process = h.process) "     \
    "  OR EXISTS (SELECT 1 FROM work_backoff b WHERE b.machine_id = h.machine_id AND b.process = h.process)) " \
    " AND NOT EXISTS (SELECT 1 FROM work_history n WHERE n.machine_id = h.machine_id "                 \
    "  AND n.process = h.process AND (n.occurred_at, n.history_id) > (h.occurred_at, h.history_id)))), "
/* A loop's state is its loops row (schedule, failures, last cause), never
 * its history: every old event may go. */
#define VICTIMS_LOOP "victims AS (SELECT history_id FROM scan), "
#define DELETE_VICTIMS(table) \
    "gone AS (DELETE FROM " table " WHERE history_id IN (SELECT history_id FROM victims) RETURNING 1), "
#define COUNT_VICTIMS "gone AS (SELECT 1 FROM victims), "
#define RESULT                                                                                      \
    "last AS (SELECT occurred_at, history_id FROM scan ORDER BY occurred_at DESC, history_id DESC LIMIT 1) " \
    "SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM scan), "                              \
    "(SELECT occurred_at::TEXT FROM last), (SELECT history_id::TEXT FROM last)"

#define WORK_SQL(after, act) SCAN_WORK after SCAN_END VICTIMS_WORK act RESULT
#define LOOP_SQL(after, act) SCAN_LOOP after SCAN_END VICTIMS_LOOP act RESULT
static const char *const batch_sql[PRUNE_TABLES][2][2] = {
    /* [table][dry_run][after a cursor] */
    [PRUNE_WORK_HISTORY] = {{WORK_SQL("", DELETE_VICTIMS("work_history")),
                             WORK_SQL(SCAN_AFTER, DELETE_VICTIMS("work_history"))},
                            {WORK_SQL("", COUNT_VICTIMS), WORK_SQL(SCAN_AFTER, COUNT_VICTIMS)}},
    [PRUNE_LOOP_HISTORY] = {{LOOP_SQL("", DELETE_VICTIMS("loop_history")),
                             LOOP_SQL(SCAN_AFTER, DELETE_VICTIMS("loop_history"))},
                            {LOOP_SQL("", COUNT_VICTIMS), LOOP_SQL(SCAN_AFTER, COUNT_VICTIMS)}},
};

const char *const prune_table_names[PRUNE_TABLES] = {"work_history", "loop_history"};

/* Set once by main() before any thread starts; read without a lock. */
static int keep_history = PRUNE_KEEP_DAYS;
void prune_set_keep_history(int days) { keep_history = days; }
int prune_keep_history(void) { return keep_history; }

int prune_cutoff(pool *p, const char *before, int keep_days, char *cutoff, size_t len, char *err, size_t errlen) {
    PGconn *c = pool_get(p, POOL_WAIT_S, err, errlen);
    if (!c) return -1;
    char days[16];
    snprintf(days, sizeof days, "%d", keep_days);
    const char *params[] = {before ? before : days};
    PGresult *r = PQexecParams(c,
                               before ? "SELECT $1::TIMESTAMPTZ::TEXT, $1::TIMESTAMPTZ > now()"
                                      : "SELECT (now() - $1::INT8 * INTERVAL '1 day')::TEXT, false",
                               1, NULL, params, NULL, NULL, 0);
    int rc = 0;
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        pq_error pe;
        pq_error_read(&pe, c, r);
        /* class 22: the server could not read it as a timestamp */
        if (before && !strncmp(pe.sqlstate, "22", 2)) {
            snprintf(err, errlen, "prune: --before: not a timestamp: '%s' (%s)", before, pe.message);
            rc = -2;
        } else {
            snprintf(err, errlen, "prune: %s%s%s", pe.sqlstate, *pe.sqlstate ? " " : "", pe.message);
            rc = -1;
        }
    } else if (!strcmp(PQgetvalue(r, 0, 1), "t")) {
        /* Would delete events claims are writing now: surely a mistake. */
        snprintf(err, errlen, "prune: --before: '%s' is in the future", before);
        rc = -2;
    } else {
        snprintf(cutoff, len, "%s", PQgetvalue(r, 0, 0));
    }
    PQclear(r);
    pool_put(p, c);
    return rc;
}

/* One try of a batch on c. 0, or -1 with e (and retry set for 40001/40P01). */
static int batch_once(PGconn *c, const char *cutoff, int limit, int dry_run, prune_cursor *cur, long *removed,
                      int *more, pq_error *e, int *retry) {
    char lim[16];
    snprintf(lim, sizeof lim, "%d", limit);
    const char *params[] = {cutoff, lim, cur->at, cur->id};
    int after = cur->at[0] != '\0';
    *retry = 0;
    PGresult *r = PQexec(c, "BEGIN ISOLATION LEVEL READ COMMITTED");
    int ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    if (ok) {
        PQclear(r);
        r = PQexecParams(c, batch_sql[cur->table][dry_run != 0][after], after ? 4 : 2, NULL, params, NULL, NULL,
                         0);
        ok = PQresultStatus(r) == PGRES_TUPLES_OK;
    }
    if (ok) {
        *removed = strtol(PQgetvalue(r, 0, 0), NULL, 10);
        long scanned = strtol(PQgetvalue(r, 0, 1), NULL, 10);
        if (scanned == limit) {
            *more = 1;
        } else {
            /* this table is done: the next batch starts the next one */
            *more = cur->table + 1 < PRUNE_TABLES;
            scanned = 0;
            cur->table++;
            cur->at[0] = cur->id[0] = '\0';
        }
        if (scanned > 0) {
            snprintf(cur->at, sizeof cur->at, "%s", PQgetvalue(r, 0, 2));
            snprintf(cur->id, sizeof cur->id, "%s", PQgetvalue(r, 0, 3));
        }
        PQclear(r);
        r = PQexec(c, dry_run ? "ROLLBACK" : "COMMIT");
        ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    }
    if (!ok) {
        pq_error_read(e, c, r);
        *retry = !strcmp(e->sqlstate, "40001") || !strcmp(e->sqlstate, "40P01");
        PQclear(PQexec(c, "ROLLBACK"));
    }
    PQclear(r);
    return ok ? 0 : -1;
}

int prune_batch(pool *p, const char *cutoff, int limit, int dry_run, prune_cursor *cur, long *removed, int *more,
                char *err, size_t errlen) {
    if (cur->table < 0 || cur->table >= PRUNE_TABLES) {
        *removed = 0, *more = 0;
        return 0;
    }
    for (int attempt = 1;; attempt++) {
        PGconn *c = pool_get(p, POOL_WAIT_S, err, errlen);
        if (!c) return -1;
        prune_cursor next = *cur; /* moved only by a batch that committed */
        pq_error e;
        int retry;
        int rc = batch_once(c, cutoff, limit, dry_run, &next, removed, more, &e, &retry);
        pool_put(p, c);
        if (rc == 0) {
            *cur = next;
            return 0;
        }
        double delay = retry ? tx_retry_delay(attempt) : -1;
        if (delay < 0) {
            snprintf(err, errlen, "prune: %s%s%s", e.sqlstate, *e.sqlstate ? " " : "", e.message);
            return -1;
        }
        mono_sleep(delay);
    }
}

/* ---- the command line ------------------------------------------------------ */

static int parse_count(const char *flag, const char *v, int min, int max, int *out, char *err, size_t errlen) {
    char *end;
    errno = 0;
    long n = v ? strtol(v, &end, 10) : 0;
    if (!v || errno || *end || end == v || n < min || n > max)
        return snprintf(err, errlen, "prune: %s: expected a whole number from %d to %d, got '%s'", flag, min, max,
                        v ? v : ""), -1;
    *out = (int)n;
    return 0;
}

int prune_parse(int argc, char **argv, prune_args *a, char *err, size_t errlen) {
    memset(a, 0, sizeof *a);
    a->keep_days = PRUNE_KEEP_DAYS;
    a->batch = PRUNE_BATCH;
    int days_given = 0;
    for (int i = 0; i < argc; i++) {
        const char *o = argv[i];
        int has_value = !strcmp(o, "--before") || !strcmp(o, "--keep-days") || !strcmp(o, "--batch");
        if (has_value && i + 1 >= argc) return snprintf(err, errlen, "prune: option %s needs a value", o), -1;
        if (!strcmp(o, "--before")) {
            a->before = argv[++i];
            if (!*a->before) return snprintf(err, errlen, "prune: --before: empty timestamp"), -1;
        } else if (!strcmp(o, "--keep-days")) {
            if (parse_count(o, argv[++i], 0, PRUNE_KEEP_MAX, &a->keep_days, err, errlen) < 0) return -1;
            days_given = 1;
        } else if (!strcmp(o, "--batch")) {
            if (parse_count(o, argv[++i], 1, PRUNE_MAX_BATCH, &a->batch, err, errlen) < 0) return -1;
        } else if (!strcmp(o, "--dry-run")) {
            a->dry_run = 1;
        } else if (o[0] == '-' && o[1]) {
            return snprintf(err, errlen, "prune: unknown option '%s'", o), -1;
        } else {
            return snprintf(err, errlen, "prune: unexpected argument '%s' (expected [--before TIME] "
                            "[--keep-days DAYS] [--dry-run] [--batch N])", o), -1;
        }
    }
    if (a->before && days_given)
        return snprintf(err, errlen, "prune: --before and --keep-days exclude each other"), -1;
    return 0;
}

int prune_run(pool *p, const prune_args *a, FILE *out, char *err, size_t errlen) {
    if (!a->before && a->keep_days == 0) {
        fprintf(out, "--keep-days 0: history is kept, nothing pruned\n");
        return 0;
    }
    char cutoff[64];
    int rc = prune_cutoff(p, a->before, a->keep_days, cutoff, sizeof cutoff, err, errlen);
    if (rc < 0) return rc;
    prune_cursor cur = {0};
    long total[PRUNE_TABLES] = {0}, batches = 0;
    for (int more = 1; more;) {
        long n;
        int table = cur.table;
        if (batches > 0) mono_sleep(PRUNE_PAUSE_S);
        if (prune_batch(p, cutoff, a->batch, a->dry_run, &cur, &n, &more, err, errlen) < 0) {
            long all = total[PRUNE_WORK_HISTORY] + total[PRUNE_LOOP_HISTORY];
            if (all && !a->dry_run) fprintf(out, "%ld rows deleted before the error\n", all);
            return -1;
        }
        total[table] += n;
        batches++;
    }
    long all = total[PRUNE_WORK_HISTORY] + total[PRUNE_LOOP_HISTORY];
    fprintf(out, "%s %ld history row%s older than %s (%s %ld, %s %ld; %ld batch%s of at most %d)\n",
            a->dry_run ? "dry run: would delete" : "deleted", all, all == 1 ? "" : "s", cutoff,
            prune_table_names[PRUNE_WORK_HISTORY], total[PRUNE_WORK_HISTORY], prune_table_names[PRUNE_LOOP_HISTORY],
            total[PRUNE_LOOP_HISTORY], batches, batches == 1 ? "" : "es", a->batch);
    return 0;
}
