/* work.c -- locking one (machine, process) to a session, and letting go.
 *
 * A work row is the lock: its primary key (machine_id, process) admits one
 * holder. Both functions run inside the caller's fenced SERIALIZABLE
 * transaction, so a lock changes hands only while its session lives, and a
 * concurrent claim of the same pair either sees our row or conflicts. The
 * life of a work item: host/README.md. */
#include "work.h"
#include "session.h"
#include "strays.h"
#include "log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uuid/uuid.h>

/* Each dead item counts as its failure for backoff, with the spec stored at
 * its claim (a poison pill must not crash-loop the fleet), unless its
 * session was lost because the database went away (WORK_LOST_TO_OUTAGE:
 * recorded Abandoned all the same, with a cause that says so); a work row
 * past its own timeout, its session alive, is ended too (Failed, its
 * timeout as cause). The events carry the claim's token, so a body told
 * "lost" can be told why. */
#define COLLECT_SQL(lost)                                                                         \
    {"INSERT INTO work_history (machine_id, process, session_id, event, cause, token) "            \
     "SELECT w.machine_id, w.process, w.session_id, 'Abandoned', " WORK_EXPIRED_CAUSE(lost("s"))  \
     ", w.token FROM work w JOIN sessions s ON s.session_id = w.session_id WHERE s.deadline <= now()", \
     WORK_PENALTY_SQL("'session expired'",                                                         \
                      "w.session_id IN (SELECT session_id FROM sessions s WHERE s.deadline <= now() " \
                      "AND NOT " lost("s") ")"),                                                   \
     "INSERT INTO work_history (machine_id, process, session_id, event, cause, token) "            \
     "SELECT w.machine_id, w.process, w.session_id, 'Failed', " WORK_TIMEOUT_CAUSE ", w.token "    \
     "FROM work w JOIN sessions s ON s.session_id = w.session_id "                                 \
     "WHERE s.deadline > now() AND w.deadline <= now()",                                           \
     WORK_PENALTY_SQL(WORK_TIMEOUT_CAUSE,                                                          \
                      "w.deadline <= now() AND w.session_id IN "                                   \
                      "(SELECT session_id FROM sessions WHERE deadline > now())"),                 \
     "DELETE FROM work w WHERE w.deadline <= now() AND w.session_id IN "                           \
     "(SELECT session_id FROM sessions WHERE deadline > now())",                                   \
     "DELETE FROM sessions WHERE deadline <= now()"}

static const char *const collect_sql[] = COLLECT_SQL(WORK_LOST_TO_OUTAGE);
static const char *const collect_plain_sql[] = COLLECT_SQL(WORK_LOST_NEVER);

static const char *const end_sql[] = {
    "INSERT INTO work_history (machine_id, process, session_id, event, cause, token) "
    "SELECT machine_id, process, session_id, 'Canceled', 'host shutdown', token "
    "FROM work WHERE session_id = $1",
    "DELETE FROM sessions WHERE session_id = $1",
};

const struct session_housekeeping work_housekeeping = {collect_sql, 6, end_sql, 2, strays_sweep,
                                                       strays_release_given, collect_plain_sql,
                                                       work_outage_rule_on, work_outage_rule_off};

static int rule_off; /* atomic: set once, never cleared */

int work_outage_rule_on(void) {
    return !__atomic_load_n(&rule_off, __ATOMIC_RELAXED);
}

int work_outage_rule_off(const char *error) {
    if (!error || (!strstr(error, "pg_postmaster_start_time") && !strstr(error, "pg_last_xact_replay_timestamp")))
        return 0;
    if (!__atomic_exchange_n(&rule_off, 1, __ATOMIC_RELAXED))
        log_kv(LOG_INFO, "the server cannot say when it started (not PostgreSQL?): every expired session "
                         "counts against its items, a database outage too",
               "error", error, NULL);
    return 1;
}

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

/* Takes over the one work row of (machine, process) whose timeout passed
 * while its session lives: recorded Failed with the timeout as cause and
 * penalized with the holder's backoff spec, like any failure. The DELETE
 * waits (bounded) for the holder's transaction in flight, which holds a
 * KEY SHARE lock on the row (its fence, tx.c). */
static int take_over_timed_out(tx *t, const char *machine, const char *process, tx_error *e) {
    const char *mp[] = {machine, process};
    const char *timeout[] = {TAKEOVER_LOCK_TIMEOUT};
    if (tx_run(t, "SELECT set_config('lock_timeout', $1, true)", 1, timeout, NULL, e) < 0 ||
        tx_run(t,
            "INSERT INTO work_history (machine_id, process, session_id, event, cause, token) "
            "SELECT machine_id, process, session_id, 'Failed', " WORK_TIMEOUT_CAUSE ", token "
            "FROM work w WHERE machine_id = $1 AND process = $2 AND deadline <= now()",
            2, mp, NULL, e) < 0 ||
        tx_run(t, WORK_PENALTY_SQL(WORK_TIMEOUT_CAUSE, "w.machine_id = $1 AND w.process = $2 AND w.deadline <= now()"),
            2, mp, NULL, e) < 0 ||
        tx_run(t, "DELETE FROM work WHERE machine_id = $1 AND process = $2 AND deadline <= now()", 2,
            mp, NULL, e) < 0)
        return -1;
    return 0;
}

/* Ends the expired session `holder` inside our claim, as a collector would:
 * every work row it holds is recorded Abandoned, counts as a failure for
 * backoff unless the database went away (WORK_LOST_TO_OUTAGE; a poison pill that kills its host each time backs off instead
 * of crash-looping the fleet), and goes with the session row. Deleting
 * the session row (not just our pair's work row) is what makes the
 * takeover conflict with a transaction of the old session still in
 * flight: that transaction holds a KEY SHARE lock on the row, or on its
 * item's work row, to which the DELETE cascades (tx.c), so we wait for
 * its COMMIT, and then either see its effects or fail with a
 * serialization error and retry. The wait is bounded: a zombie whose
 * backend hangs must not hang our slot with it (55P03, the claim is tried
 * again at the next poll). */
#define TAKE_OVER_SQL(lost)                                                                       \
    {"INSERT INTO work_history (machine_id, process, session_id, event, cause, token) "            \
     "SELECT w.machine_id, w.process, w.session_id, 'Abandoned', " WORK_EXPIRED_CAUSE(lost("s"))  \
     ", w.token FROM work w JOIN sessions s ON s.session_id = w.session_id WHERE w.session_id = $1", \
     WORK_PENALTY_SQL("'session expired'", "w.session_id IN (SELECT session_id FROM sessions s "     \
                      "WHERE s.session_id = $1 AND NOT " lost("s") ")")}

static int take_over(tx *t, const char *holder, tx_error *e) {
    static const char *const rule[] = TAKE_OVER_SQL(WORK_LOST_TO_OUTAGE);
    static const char *const plain[] = TAKE_OVER_SQL(WORK_LOST_NEVER);
    const char *const *sql = work_outage_rule_on() ? rule : plain;
    const char *hp[] = {holder};
    const char *timeout[] = {TAKEOVER_LOCK_TIMEOUT};
    if (tx_run(t, "SELECT set_config('lock_timeout', $1, true)", 1, timeout, NULL, e) < 0 ||
        tx_run(t, sql[0], 1, hp, NULL, e) < 0 || tx_run(t, sql[1], 1, hp, NULL, e) < 0 ||
        tx_run(t, "DELETE FROM sessions WHERE session_id = $1 AND deadline <= now()", 1, hp, NULL, e) < 0) {
        work_outage_rule_off(e->message); /* the claim is tried again, without the rule */
        return -1;
    }
    return 0;
}

/* Reads the backoff of (machine, process) after a takeover penalized it. */
static int backoff_state(tx *t, const char *machine, const char *process, int *active, int *attempts,
                         char *until, size_t untillen, tx_error *e) {
    const char *mp[] = {machine, process};
    PGresult *r;
    long n = tx_run(t,
                 "SELECT backoff_until > now(), backoff_until, attempts FROM work_backoff "
                 "WHERE machine_id = $1 AND process = $2",
                 2, mp, &r, e);
    if (n < 0) return -1;
    *active = n == 1 && strcmp(PQgetvalue(r, 0, 0), "t") == 0;
    *attempts = n == 1 ? atoi(PQgetvalue(r, 0, 2)) : 0;
    if (*active && until) snprintf(until, untillen, "%s", PQgetvalue(r, 0, 1));
    PQclear(r);
    return 0;
}

/* The lock statement, for one machine (work_lock) or for a claim's
 * candidates (work_lock_any): up to $8 of the machines in the UUID array
 * $1 that no pause, hold, live lock or backoff keeps from process $2 are
 * locked for session $3 (timeout and backoff spec $4-$7), each with its
 * Started event; a row each: machine, token, attempts so far. No ORDER BY:
 * the first free ones in the order the database reads them will do (a
 * claim shuffled them), and without a sort the checks stop at the first
 * that pass instead of running for every candidate. A candidate whose
 * holder's session or timeout ended counts as free here; its INSERT then
 * meets the old row and locks nothing (ON CONFLICT keeps the transaction
 * usable, where a 23505 would abort it), and work_lock takes it over. */
static const char lock_sql[] =
    "WITH cand AS (SELECT c.machine_id FROM unnest($1::UUID[]) AS c (machine_id)"
    " WHERE NOT EXISTS (SELECT 1 FROM processes WHERE process = $2 AND paused_at IS NOT NULL)"
    " AND NOT EXISTS (SELECT 1 FROM machine_holds h WHERE h.machine_id = c.machine_id)"
    " AND NOT EXISTS (SELECT 1 FROM work w JOIN sessions s ON s.session_id = w.session_id"
    "  WHERE w.machine_id = c.machine_id AND w.process = $2 AND s.deadline > now()"
    "  AND (w.deadline IS NULL OR w.deadline > now()))"
    " AND NOT EXISTS (SELECT 1 FROM work_backoff b WHERE b.machine_id = c.machine_id"
    "  AND b.process = $2 AND b.backoff_until > now())"
    " LIMIT $8::INT8), "
    "locked AS (INSERT INTO work (machine_id, process, session_id, deadline, timeout_seconds, "
    " backoff_initial, backoff_maximum, backoff_exponent) "
    " SELECT machine_id, $2, $3, now() + $4::NUMERIC::FLOAT8 * INTERVAL '1 second', $4::NUMERIC, "
    " $5::INT8, $6::INT8, $7::NUMERIC FROM cand"
    " ON CONFLICT (machine_id, process) DO NOTHING"
    " RETURNING machine_id, process, session_id, token), "
    "started AS (INSERT INTO work_history (machine_id, process, session_id, event, token)"
    " SELECT machine_id, process, session_id, 'Started', token FROM locked RETURNING 1) "
    "SELECT l.machine_id, l.token, (SELECT b.attempts FROM work_backoff b"
    " WHERE b.machine_id = l.machine_id AND b.process = $2) AS attempts FROM locked l";

/* lock_sql's parameters, into p[8]; count points at caller storage. */
static void lock_params(const char **p, tx *t, const char *candidates, const char *process,
                        const work_claim *c, const char *count) {
    const char *v[] = {candidates, process, session_id(t->sess), c ? c->timeout : NULL,
                       c ? c->backoff_initial : NULL, c ? c->backoff_maximum : NULL,
                       c ? c->backoff_exponent : NULL, count};
    memcpy(p, v, sizeof v);
}

/* Row i of lock_sql's answer into machine (if not NULL) and out. */
static int read_locked(const PGresult *r, int i, char *machine, size_t machinelen, work_locked *out) {
    if (!r || i >= PQntuples(r)) return 0;
    if (machine) snprintf(machine, machinelen, "%s", PQgetvalue(r, i, 0));
    snprintf(out->token, sizeof out->token, "%s", PQgetvalue(r, i, 1));
    out->attempt = (PQgetisnull(r, i, 2) ? 0 : atoi(PQgetvalue(r, i, 2))) + 1;
    strays_own(out->token);
    return 1;
}

/* lock_sql for one machine, now: WORK_LOCKED with out filled, WORK_HELD
 * when it locked nothing (the caller then finds out why), WORK_ERROR. */
static work_lock_result lock_one(tx *t, const char *machine, const char *process,
                                 const work_claim *c, work_locked *out, tx_error *e) {
    char one[48];
    snprintf(one, sizeof one, "{%s}", machine);
    const char *p[8];
    lock_params(p, t, one, process, c, "1");
    PGresult *r;
    long n = tx_run(t, lock_sql, 8, p, &r, e);
    if (n < 0) {
        if (e->kind == TXE_SQL && strcmp(e->sqlstate, "23503") == 0)
            snprintf(e->message, sizeof e->message, "machine %s does not exist", machine);
        return WORK_ERROR;
    }
    read_locked(r, 0, NULL, 0, out);
    PQclear(r);
    return n == 1 ? WORK_LOCKED : WORK_HELD;
}

/* The usual claim: lock_sql over the candidates, sent with COMMIT. */
int work_lock_any(tx *t, const char *candidates, int count, const char *process,
                  const work_claim *c, tx_error *e) {
    char n[16];
    snprintf(n, sizeof n, "%d", count < 1 ? 1 : count);
    const char *p[8];
    lock_params(p, t, candidates, process, c, n);
    return tx_set_final(t, lock_sql, 8, p, 0, e);
}

int work_locked_any(const tx *t, int i, char *machine, size_t machinelen, work_locked *out) {
    return read_locked(t->final_result, i, machine, machinelen, out);
}

work_lock_result work_lock(tx *t, const char *machine, const char *process, const work_claim *c,
                           work_locked *out, tx_error *e) {
    const char *mp[] = {machine, process};
    PGresult *r;
    memset(out, 0, sizeof *out);

    /* The common case first, in one statement: nothing pauses, holds,
     * locks or backs off the pair, so lock it and record Started. Only
     * when that locks nothing does the claim read why (below). */
    work_lock_result fast = lock_one(t, machine, process, c, out, e);
    if (fast != WORK_HELD) return fast;

    /* One read for everything a claim must know: a pause of the process, a
     * hold of the machine, the holder (if any) and whether its session or
     * its timeout ended, and the backoff. */
    long n = tx_run(t,
                 "SELECT (SELECT coalesce(pause_reason, '') FROM processes "
                 "        WHERE process = $2 AND paused_at IS NOT NULL) AS paused, "
                 "(SELECT coalesce(reason, '') FROM machine_holds WHERE machine_id = $1) AS held, "
                 "w.session_id, s.deadline > now(), w.deadline <= now(), "
                 "b.backoff_until > now(), b.backoff_until, b.attempts "
                 "FROM (SELECT 1) AS one "
                 "LEFT JOIN work w ON w.machine_id = $1 AND w.process = $2 "
                 "LEFT JOIN sessions s ON s.session_id = w.session_id "
                 "LEFT JOIN work_backoff b ON b.machine_id = $1 AND b.process = $2",
                 2, mp, &r, e);
    if (n < 0) return WORK_ERROR;
    if (!PQgetisnull(r, 0, 0) || !PQgetisnull(r, 0, 1)) {
        int paused = !PQgetisnull(r, 0, 0);
        snprintf(out->why, sizeof out->why, "%s", PQgetvalue(r, 0, paused ? 0 : 1));
        PQclear(r);
        return paused ? WORK_PAUSED : WORK_ON_HOLD;
    }
    int holder = !PQgetisnull(r, 0, 2), live = !strcmp(PQgetvalue(r, 0, 3), "t"),
        timed_out = !strcmp(PQgetvalue(r, 0, 4), "t");
    int active = !strcmp(PQgetvalue(r, 0, 5), "t");
    int attempts = PQgetisnull(r, 0, 7) ? 0 : atoi(PQgetvalue(r, 0, 7));
    char session[40];
    snprintf(session, sizeof session, "%s", PQgetvalue(r, 0, 2));
    if (active) snprintf(out->until, sizeof out->until, "%s", PQgetvalue(r, 0, 6));
    PQclear(r);
    if (holder && live && !timed_out) return WORK_HELD;
    if (holder) {
        /* A holder whose session is past its deadline holds nothing
         * (host/README.md, guarantee 4), nor one past its own timeout: take the row over now
         * rather than wait for a collector. The takeover counts as the
         * item's failure, so its backoff is read again. */
        if ((live ? take_over_timed_out(t, machine, process, e) : take_over(t, session, e)) < 0 ||
            backoff_state(t, machine, process, &active, &attempts, out->until, sizeof out->until, e) < 0)
            return WORK_ERROR;
    }
    out->attempt = attempts + 1;
    if (active) return WORK_BACKOFF;

    /* The same statement as the fast path, now that a takeover freed the
     * pair: a live holder that committed since locks us out (WORK_HELD). */
    return lock_one(t, machine, process, c, out, e);
}

/* The release's first part, shared by both forms below: our work row
 * (with its token, if any) goes, and the event is recorded. */
#define WORK_RELEASE_CTE                                                                      \
    "WITH gone AS (DELETE FROM work WHERE machine_id = $1 AND process = $2 AND session_id = $3 " \
    " AND ($4::UUID IS NULL OR token = $4::UUID) AND (deadline IS NULL OR deadline > now()) " \
    " RETURNING machine_id, process, session_id, token), " \
    "recorded AS (INSERT INTO work_history (machine_id, process, session_id, event, cause, token) " \
    " SELECT machine_id, process, session_id, $5::TEXT, $6::TEXT, token FROM gone RETURNING 1) "

int work_release(tx *t, const char *machine, const char *process, const char *token,
                 const char *event, const char *cause, long backoff_seconds, tx_error *e) {
    /* One statement: the lock, the event and the backoff change together.
     * It rides with COMMIT (tx_set_final), so it must fail by raising:
     * dividing by the count of rows it released makes a lock that is no
     * longer ours a division by zero, which keeps the COMMIT behind it
     * from running (tx.c reports it as TXE_LOST). The item fence has
     * already checked our row and holds it KEY SHARE until COMMIT, so
     * this is the belt to the fence's braces; in a batch of one, which
     * has no item fence (sched_batch.c), it checks token and timeout alone. */
    char secs[32];
    snprintf(secs, sizeof secs, "%ld", backoff_seconds < 1 ? 1 : backoff_seconds);
    const char *p[] = {machine, process, session_id(t->sess), token, event, cause, secs};
    if (strcmp(event, "Failed") == 0)
        return tx_set_final(t,
                WORK_RELEASE_CTE
                ", penalized AS (INSERT INTO work_backoff (machine_id, process, backoff_until, "
                " last_seconds, attempts, cause) "
                " SELECT machine_id, process, now() + $7::INT8 * INTERVAL '1 second', $7::INT8, 1, "
                " coalesce($6::TEXT, 'failed') FROM gone "
                " ON CONFLICT (machine_id, process) DO UPDATE SET "
                " backoff_until = excluded.backoff_until, last_seconds = excluded.last_seconds, "
                " attempts = work_backoff.attempts + 1, cause = excluded.cause RETURNING 1) "
                "SELECT 1 / (SELECT count(*) FROM gone)",
                7, p, 1, e);
    return tx_set_final(t,
            WORK_RELEASE_CTE
            ", cleared AS (DELETE FROM work_backoff WHERE $5::TEXT = 'Finished' "
            " AND machine_id = $1 AND process = $2 AND EXISTS (SELECT 1 FROM gone) RETURNING 1) "
            "SELECT 1 / (SELECT count(*) FROM gone)",
            6, p, 1, e);
}

int work_release_finished(tx *t, const char *machines, const char *processes, const char *tokens,
                          int count, tx_error *e) {
    /* The single release above, for several items: arrays instead of
     * values, so the statement is prepared once whatever the count. A
     * claim's token names one work row (a random UUID, new per claim), so
     * matching each array alone is exact, and the primary key is read by
     * its machine ids. The session is checked in the division, not in the
     * WHERE: there PostgreSQL chose work_session's index, estimating a row
     * or two per session, and a bitmap scan of it read the entry of every
     * item the session had released since the last vacuum (4,315 of them
     * for 4 rows, 7,000 items into a run). The division compares the rows
     * released, all of this session, with the items named: one lock that
     * is gone (or past its timeout, which the item fence would have
     * refused) fails them all, and the batch's members then finish one by
     * one, where each learns its own answer. */
    char n[16];
    snprintf(n, sizeof n, "%d", count);
    const char *p[] = {machines, processes, tokens, session_id(t->sess), n};
    return tx_set_final(t,
            "WITH gone AS (DELETE FROM work WHERE machine_id = ANY($1::UUID[]) "
            " AND process = ANY($2::TEXT[]) AND token = ANY($3::UUID[]) "
            " AND (deadline IS NULL OR deadline > now()) "
            " RETURNING machine_id, process, session_id, token), "
            "recorded AS (INSERT INTO work_history (machine_id, process, session_id, event, cause, token) "
            " SELECT machine_id, process, session_id, 'Finished', NULL, token FROM gone RETURNING 1), "
            "cleared AS (DELETE FROM work_backoff "
            " WHERE (machine_id, process) IN (SELECT machine_id, process FROM gone) RETURNING 1) "
            "SELECT 1 / ((SELECT count(*) FROM gone WHERE session_id = $4) / $5::INT8)",
            5, p, 0, e);
}

long work_backoff_last(tx *t, const char *machine, const char *process, tx_error *e) {
    const char *mp[] = {machine, process};
    PGresult *r;
    long n = tx_run(t, "SELECT last_seconds FROM work_backoff WHERE machine_id = $1 AND process = $2",
                 2, mp, &r, e);
    if (n < 0) return -1;
    long last = n == 1 ? atol(PQgetvalue(r, 0, 0)) : 0;
    PQclear(r);
    return last;
}
