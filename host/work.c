/* work.c -- locking one (machine, process) to a session, and letting go.
 *
 * A work row is the lock: its primary key (machine_id, process) admits one
 * holder. Both functions run inside the caller's fenced SERIALIZABLE
 * transaction, so a lock changes hands only while its session lives, and a
 * concurrent claim of the same pair either sees our row or conflicts. */
#include "work.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uuid/uuid.h>

/* How long a takeover waits for the old session's last transaction. */
#define TAKEOVER_LOCK_TIMEOUT "5s"

int work_valid_uuid(const char *s) {
    uuid_t u;
    return s && strlen(s) == 36 && uuid_parse(s, u) == 0;
}

int work_valid_process(const char *s) {
    /* Mirrors the CHECK on work.process, so bad names fail before SQL. */
    if (!s || !((*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z'))) return 0;
    size_t n = 0;
    for (; s[n]; n++) {
        char c = s[n];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'))
            return 0;
    }
    return n <= 63;
}

/* Runs one statement; on success returns rows returned or affected. */
static long run(tx *t, const char *sql, int n, const char *const *params, PGresult **out,
                tx_error *e) {
    PGresult *r = tx_exec(t, sql, n, params, e);
    if (!r) return -1;
    long rows = PQresultStatus(r) == PGRES_TUPLES_OK ? PQntuples(r) : atol(PQcmdTuples(r));
    if (out) *out = r;
    else PQclear(r);
    return rows;
}

static int record(tx *t, const char *machine, const char *process, const char *sess,
                  const char *event, const char *cause, tx_error *e) {
    const char *p[] = {machine, process, sess, event, cause};
    return run(t,
               "INSERT INTO work_history (machine_id, process, session_id, event, cause) "
               "VALUES ($1, $2, $3, $4, $5)",
               5, p, NULL, e) < 0 ? -1 : 0;
}

/* Ends the expired session `holder` inside our claim, as a collector would:
 * every work row it holds is recorded Abandoned and goes with the session
 * row. Deleting the session row (not just our pair's work row) is what
 * makes the takeover conflict with a transaction of the old session still
 * in flight: that transaction holds a KEY SHARE lock on the row (tx.c), so
 * we wait for its COMMIT, and then either see its effects or fail with a
 * serialization error and retry. The wait is bounded: a zombie whose
 * backend hangs must not hang our slot with it (55P03, the claim is tried
 * again at the next poll). */
static int take_over(tx *t, const char *holder, tx_error *e) {
    const char *hp[] = {holder};
    const char *timeout[] = {TAKEOVER_LOCK_TIMEOUT};
    if (run(t, "SELECT set_config('lock_timeout', $1, true)", 1, timeout, NULL, e) < 0 ||
        run(t,
            "INSERT INTO work_history (machine_id, process, session_id, event, cause) "
            "SELECT machine_id, process, session_id, 'Abandoned', 'session expired' "
            "FROM work WHERE session_id = $1",
            1, hp, NULL, e) < 0 ||
        run(t, "DELETE FROM sessions WHERE session_id = $1 AND deadline <= now()", 1, hp, NULL, e) < 0)
        return -1;
    return 0;
}

work_lock_result work_lock(tx *t, const char *machine, const char *process, int *attempt,
                           char *until, size_t untillen, tx_error *e) {
    const char *mp[] = {machine, process};
    PGresult *r;

    /* A holder whose session is past its deadline holds nothing (DESIGN.md):
     * take the row over now rather than wait for a collector. */
    long n = run(t,
                 "SELECT w.session_id, s.deadline > now() FROM work w "
                 "JOIN sessions s ON s.session_id = w.session_id "
                 "WHERE w.machine_id = $1 AND w.process = $2",
                 2, mp, &r, e);
    if (n < 0) return WORK_ERROR;
    if (n == 1) {
        int live = strcmp(PQgetvalue(r, 0, 1), "t") == 0;
        char holder[40];
        snprintf(holder, sizeof holder, "%s", PQgetvalue(r, 0, 0));
        PQclear(r);
        if (live) return WORK_HELD;
        if (take_over(t, holder, e) < 0) return WORK_ERROR;
    } else {
        PQclear(r);
    }

    n = run(t,
            "SELECT backoff_until > now(), backoff_until, attempts FROM work_backoff "
            "WHERE machine_id = $1 AND process = $2",
            2, mp, &r, e);
    if (n < 0) return WORK_ERROR;
    *attempt = 1;
    if (n == 1) {
        int active = strcmp(PQgetvalue(r, 0, 0), "t") == 0;
        if (active && until) snprintf(until, untillen, "%s", PQgetvalue(r, 0, 1));
        *attempt = atoi(PQgetvalue(r, 0, 2)) + 1;
        PQclear(r);
        if (active) return WORK_BACKOFF;
    } else {
        PQclear(r);
    }

    /* ON CONFLICT keeps the transaction usable when a live holder committed
     * between our read and our insert (a 23505 would abort it). */
    const char *ip[] = {machine, process, session_id(t->sess)};
    n = run(t,
            "INSERT INTO work (machine_id, process, session_id) VALUES ($1, $2, $3) "
            "ON CONFLICT (machine_id, process) DO NOTHING",
            3, ip, NULL, e);
    if (n < 0) {
        if (e->kind == TXE_SQL && strcmp(e->sqlstate, "23503") == 0)
            snprintf(e->message, sizeof e->message, "machine %s does not exist", machine);
        return WORK_ERROR;
    }
    if (n == 0) return WORK_HELD;
    if (record(t, machine, process, session_id(t->sess), "Started", NULL, e) < 0) return WORK_ERROR;
    return WORK_LOCKED;
}

int work_release(tx *t, const char *machine, const char *process, const char *event,
                 const char *cause, long backoff_seconds, tx_error *e) {
    const char *sess = session_id(t->sess);
    const char *dp[] = {machine, process, sess};
    long n = run(t, "DELETE FROM work WHERE machine_id = $1 AND process = $2 AND session_id = $3",
                 3, dp, NULL, e);
    if (n < 0) return -1;
    if (n == 0) {
        tx_error_set(e, TXE_LOST, "lost: the lock on %s %s is no longer held by this session",
                     machine, process);
        return -1;
    }
    if (record(t, machine, process, sess, event, cause, e) < 0) return -1;

    const char *mp[] = {machine, process};
    if (strcmp(event, "Finished") == 0)
        return run(t, "DELETE FROM work_backoff WHERE machine_id = $1 AND process = $2", 2, mp,
                   NULL, e) < 0 ? -1 : 0;
    if (strcmp(event, "Failed") != 0) return 0;

    char secs[32];
    snprintf(secs, sizeof secs, "%ld", backoff_seconds < 1 ? 1 : backoff_seconds);
    const char *bp[] = {machine, process, secs, cause ? cause : "failed"};
    return run(t,
               "INSERT INTO work_backoff (machine_id, process, backoff_until, last_seconds, attempts, cause) "
               "VALUES ($1, $2, now() + $3::INT8 * INTERVAL '1 second', $3, 1, $4) "
               "ON CONFLICT (machine_id, process) DO UPDATE SET "
               "backoff_until = excluded.backoff_until, last_seconds = excluded.last_seconds, "
               "attempts = work_backoff.attempts + 1, cause = excluded.cause",
               4, bp, NULL, e) < 0 ? -1 : 0;
}

long work_backoff_last(tx *t, const char *machine, const char *process, tx_error *e) {
    const char *mp[] = {machine, process};
    PGresult *r;
    long n = run(t, "SELECT last_seconds FROM work_backoff WHERE machine_id = $1 AND process = $2",
                 2, mp, &r, e);
    if (n < 0) return -1;
    long last = n == 1 ? atol(PQgetvalue(r, 0, 0)) : 0;
    PQclear(r);
    return last;
}
