/* tx.c -- one SERIALIZABLE transaction of a session, with its fence.
 *
 * Every BMDB transaction runs at SERIALIZABLE, as CockroachDB always does:
 * at READ COMMITTED a claim can read a machine whose completion committed a
 * moment earlier and lock it again. The fence is a locking read of the
 * session row inside the same transaction, sent with its first statement
 * (tx_begin only borrows a connection): if a collector deletes the row,
 * or its deadline has passed by the transaction's now(), nothing of ours
 * commits, and a collector or takeover waits for our COMMIT to finish.
 * The local deadline is checked again right before COMMIT, because it
 * always passes before the database's (session.c). This file keeps the
 * transaction's life (its states, tx.h), what waits for the next flight,
 * the fence and what a failure means; txflight.c puts the statements on
 * the wire. The guarantees this keeps, and who else keeps them:
 * host/README.md. */
#include "tx.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lifecycle.h"
#include "metrics.h"
#include "prepared.h"
#include "txflight.h"

/* Retries are bounded by time, not by a small count: ordinary contention
 * (dozens of slots claiming from the same candidates) can need dozens of
 * attempts, and giving up then turns contention into failures. 120
 * attempts wait about 30 s in all (the delay grows to 0.25 s on average
 * and stays there), the bound bmdb.transact also keeps by the clock. */
#define TX_MAX_ATTEMPTS 120
#define TX_DELAY_FIRST 0.002
#define TX_DELAY_CAP 0.25

double tx_retry_delay(int attempt) {
    /* Full jitter around an exponential base: two transactions that
     * collided once must not collide again on the same schedule. */
    static __thread unsigned seed;
    if (!seed) seed = (unsigned)(mono_now() * 1e9) ^ (unsigned)(uintptr_t)pthread_self();
    if (attempt < 1 || attempt > TX_MAX_ATTEMPTS) return -1;
    double base = TX_DELAY_FIRST * (double)(1u << (attempt - 1 < 8 ? attempt - 1 : 8));
    if (base > TX_DELAY_CAP) base = TX_DELAY_CAP;
    return base * (0.5 + (double)rand_r(&seed) / ((double)RAND_MAX + 1.0));
}

/* ---- the transaction's life (tx.h draws it) ----------------------------- */

int tx_is_open(const tx *t) { return t->state != TX_OVER && t->state != TX_DOOMED; }

int tx_doomed(const tx *t) { return t->state == TX_DOOMED; }

const tx_error *tx_doom(const tx *t) { return t->state == TX_DOOMED ? &t->doom : NULL; }

/* BEGIN and the fence went out (and passed). */
static int begun(const tx *t) { return t->state == TX_BEGUN || t->state == TX_FAILED; }

/* A statement failed: commit refuses, only rollback is left. */
static int failed(const tx *t) { return t->state == TX_FAILED || t->state == TX_FAILED_UNBEGUN; }

/* A flight went well: BEGIN and the fence, if they rode in it, passed. */
static void flown_well(tx *t) {
    if (t->state == TX_READY) t->state = TX_BEGUN;
    else if (t->state == TX_FAILED_UNBEGUN) t->state = TX_FAILED;
}

/* One of the caller's statements was refused before it flew (its PREPARE,
 * or a binary parameter): inside a begun transaction the server's side
 * is aborted too. */
static void refused(tx *t) {
    if (t->state == TX_READY) t->state = TX_FAILED_UNBEGUN;
    else if (t->state == TX_BEGUN) t->state = TX_FAILED;
}

void tx_failure_undone(tx *t) {
    if (t->state == TX_FAILED) t->state = TX_BEGUN;
    else if (t->state == TX_FAILED_UNBEGUN) t->state = TX_READY;
}

/* Closes t after a failure that leaves nothing to do in it, remembering
 * why: every later call on t gets the same answer. */
static void doom(tx *t, const tx_error *e) {
    t->doom = *e;
    tx_rollback(t);
    t->state = TX_DOOMED;
}

/* ---- flights -------------------------------------------------------------
 *
 * A transaction's statements travel in as few flights as its logic allows
 * (txflight.c): BEGIN and the fence ride with the first statement, and the
 * final statement with COMMIT; a transaction whose only statement is its
 * final one is a single flight. That is safe because the fence and the
 * final fail by raising, never by returning fewer rows: an error keeps
 * everything behind it, COMMIT included, from running. */

#define FLIGHT_MAX (4 + TX_PENDING_MAX)

/* A queued statement (tx.h). A deferred one owns one block holding its
 * parameters' pointers, lengths and formats, its text and the values. */
typedef struct tx_pending {
    const char *sql;
    int n;
    const char **params;
    int *lengths, *formats;
    char *copy; /* NULL: the host's static SQL */
} tx_pending;

static const char begin_sql[] = "BEGIN ISOLATION LEVEL SERIALIZABLE";

/* The fence's statement and parameters for t. */
static const char *fence_of(const tx *t, const char **params);

/* BEGIN and the fence, as a flight's first steps; 0 when they went out
 * already (or t has no session: then only BEGIN). */
static int add_begin(tx *t, step *s, const char **fence_params) {
    if (begun(t)) return 0;
    s[0] = (step){.kind = STEP_BEGIN, .sql = begin_sql};
    if (!t->sess) return 1;
    const char *sql = fence_of(t, fence_params);
    int n = t->fence == TX_FENCE_ITEM ? 4 : t->fence == TX_FENCE_LOOP ? 3 : 1;
    /* Prepared before the flight: a PREPARE's answer must be read before
     * anything else is sent. Our own SQL, once per connection. */
    s[1] = (step){.kind = STEP_FENCE, .sql = sql, .n = n, .params = fence_params,
                  .name = prepared_name(t->prep, t->conn, sql, n)};
    return 2;
}

/* ---- statements queued for the next flight ------------------------------ */

/* Drops the queued statements from index from on. */
static void pending_drop(tx *t, int from) {
    for (int i = from; i < t->npending; i++) free(t->pending[i].copy);
    if (from < t->npending) t->npending = from;
}

static void pending_free(tx *t) {
    pending_drop(t, 0);
    free(t->pending);
    t->pending = NULL;
}

/* Room for one more: 0, or -1 when the queue is full (or no memory). */
static int pending_room(tx *t) {
    if (!t->pending && !(t->pending = malloc(TX_PENDING_MAX * sizeof *t->pending))) return -1;
    return t->npending < TX_PENDING_MAX ? 0 : -1;
}

/* Room for one more deferred statement: the last few places stay free
 * for the host's savepoints (tx_pend). */
static int defer_room(tx *t) { return pending_room(t) == 0 && t->npending < TX_DEFER_MAX; }

tx_mark tx_pend(tx *t, const char *sql) {
    tx_mark m = {t->flights, -1};
    /* The host pends at most three in a row (a savepoint's end, the next
     * one), and tx_defer leaves room for them: never full in practice. */
    if (pending_room(t) < 0) return m;
    m.at = t->npending;
    t->pending[t->npending++] = (tx_pending){.sql = sql};
    return m;
}

int tx_unpend(tx *t, tx_mark m, int and_after) {
    if (m.at < 0 || m.flight != t->flights || m.at >= t->npending) return 0;
    if (and_after) {
        pending_drop(t, m.at);
    } else {
        free(t->pending[m.at].copy);
        memmove(&t->pending[m.at], &t->pending[m.at + 1],
                (size_t)(t->npending - m.at - 1) * sizeof *t->pending);
        t->npending--;
    }
    return 1;
}

void tx_unpend_all(tx *t) { pending_drop(t, 0); }

/* A flight took what was queued (it ran, or the transaction is doomed):
 * marks taken before it name nothing now. */
static void pending_flown(tx *t) {
    pending_drop(t, 0);
    t->flights++;
}

static int has_deferred(const tx *t) {
    for (int i = 0; i < t->npending; i++)
        if (t->pending[i].copy) return 1;
    return 0;
}

/* sql's prepared name on t's connection (*name NULL: run it unnamed),
 * prepared now if it was not; -1 with e set when the server refused the
 * PREPARE. */
static int prepare(tx *t, const char *sql, int n, const char **name, int *cached, tx_error *e) {
    PGresult *failed;
    *name = prepared_lookup(t->prep, t->conn, sql, n, cached, &failed);
    if (!failed) return 0;
    flight_error(e, t->conn, failed);
    PQclear(failed);
    return -1;
}

/* -1 with e set when t takes no more statements: doomed (the same answer
 * again), or over. */
static int still_open(const tx *t, tx_error *e) {
    if (t->state == TX_DOOMED) {
        *e = t->doom;
        return -1;
    }
    if (!tx_is_open(t)) {
        tx_error_set(e, TXE_CLOSED, "transaction is already over");
        return -1;
    }
    return 0;
}

int tx_defer(tx *t, const char *sql, int nparams, const char *const *params, const int *lengths,
             const int *formats, tx_error *e) {
    if (still_open(t, e) < 0) return -1;
    if (failed(t)) {
        tx_error_set(e, TXE_CLOSED, "transaction aborted by an earlier error; it can only roll back");
        return -1;
    }
    /* A detached tx cannot check a binary parameter, nor run a statement
     * at once: the caller goes on with a connection (tx_init_detached). */
    int room = defer_room(t);
    int detached = t->state == TX_DETACHED;
    if (detached && (flight_has_binary(nparams, formats) || !room)) return 1;
    if (!room) {
        PGresult *r = tx_exec_params(t, sql, nparams, params, lengths, formats, e);
        PQclear(r);
        return r ? 0 : -1;
    }
    /* Prepared now, on this connection, so an error in its text is the
     * caller's to see at once; the flight looks its name up again (a
     * fresh connection after a broken first flight prepares it anew). */
    const char *name;
    int cached;
    if (!detached && (flight_check_binary(t->conn, sql, nparams, formats, e) < 0 ||
                      prepare(t, sql, nparams, &name, &cached, e) < 0)) {
        refused(t);
        return -1;
    }
    size_t len = strlen(sql) + 1, need = (size_t)nparams * (sizeof(char *) + 2 * sizeof(int)) + len;
    for (int i = 0; i < nparams; i++)
        if (params[i]) need += (formats && formats[i] ? (size_t)lengths[i] : strlen(params[i])) + 1;
    char *block = malloc(need);
    if (!block) {
        tx_error_set(e, TXE_MEMORY, "out of memory");
        return -1;
    }
    tx_pending *q = &t->pending[t->npending];
    *q = (tx_pending){.n = nparams, .copy = block};
    q->params = (const char **)block;
    q->lengths = (int *)(block + (size_t)nparams * sizeof(char *));
    q->formats = q->lengths + nparams;
    char *at = (char *)(q->formats + nparams);
    memcpy(at, sql, len);
    q->sql = at;
    at += len;
    for (int i = 0; i < nparams; i++) {
        q->lengths[i] = lengths ? lengths[i] : 0;
        q->formats[i] = formats ? formats[i] : 0;
        if (!params[i]) {
            q->params[i] = NULL;
            continue;
        }
        size_t n = q->formats[i] ? (size_t)q->lengths[i] : strlen(params[i]);
        memcpy(at, params[i], n);
        at[n] = '\0';
        q->params[i] = at;
        at += n + 1;
    }
    t->npending++;
    return 0;
}

void tx_init_detached(tx *t, session *sess) {
    memset(t, 0, sizeof *t);
    t->sess = sess;
    t->state = TX_DETACHED;
}

int tx_adopt(tx *dst, tx *src, tx_error *e) {
    int rc = 0;
    for (int i = 0; i < src->npending && rc == 0; i++) {
        tx_pending *q = &src->pending[i];
        if (still_open(dst, e) < 0) {
            rc = -1;
        } else if (defer_room(dst)) {
            dst->pending[dst->npending++] = *q; /* its copy moves with it */
            q->copy = NULL;
        } else {
            PGresult *r = tx_exec_params(dst, q->sql, q->n, q->params, q->lengths, q->formats, e);
            if (!r) rc = -1;
            PQclear(r);
        }
    }
    pending_drop(src, 0);
    return rc;
}

/* What is queued, after BEGIN and the fence. A failure among them dooms
 * the transaction, as a failed BEGIN does. Deferred statements go by
 * name, looked up on this connection (-1, with e set, when the PREPARE
 * of one failed). */
static int add_pending(tx *t, step *s, tx_error *e) {
    for (int i = 0; i < t->npending; i++) {
        tx_pending *q = &t->pending[i];
        s[i] = (step){.kind = STEP_PENDING, .sql = q->sql, .n = q->n, .params = q->params,
                      .lengths = q->lengths, .formats = q->formats, .deferred = q->copy != NULL};
        if (q->copy && prepare(t, q->sql, q->n, &s[i].name, &s[i].cached, e) < 0) {
            e->deferred = 1; /* (a detached tx's statements are prepared only now) */
            return -1;
        }
    }
    return t->npending;
}

static int add_final(tx *t, step *s) {
    if (!t->final.sql) return 0;
    *s = (step){.kind = STEP_FINAL, .sql = t->final.sql, .n = t->final.n, .params = t->final.params,
                .name = prepared_name(t->prep, t->conn, t->final.sql, t->final.n)};
    return 1;
}

/* A flight's steps up to its last: BEGIN and the fence (if they have not
 * gone out), what is queued, and the final statement (its index in
 * *final_at, else -1). The count, or -1 with e set and t doomed. */
static int add_head(tx *t, step *s, const char **fence_params, int *final_at, tx_error *e) {
    int n = add_begin(t, s, fence_params);
    int q = add_pending(t, s + n, e);
    if (q < 0) {
        doom(t, e);
        return -1;
    }
    n += q;
    *final_at = t->final.sql ? n : -1;
    return n + add_final(t, s + n);
}

static void final_free(tx_final *f) {
    free(f->heap);
    f->heap = NULL;
    f->sql = NULL;
}

int tx_set_final(tx *t, const char *sql, int nparams, const char *const *params,
                 int zero_means_lost, tx_error *e) {
    if (nparams > TX_FINAL_MAX_PARAMS || t->final.sql) {
        tx_error_set(e, TXE_SQL, "internal: a transaction takes one final statement of at most %d "
                     "parameters", TX_FINAL_MAX_PARAMS);
        return -1;
    }
    size_t need = 0;
    for (int i = 0; i < nparams; i++) need += params[i] ? strlen(params[i]) + 1 : 0;
    char *p = t->final.buf;
    if (need > sizeof t->final.buf) {
        if (!(p = t->final.heap = malloc(need))) {
            tx_error_set(e, TXE_MEMORY, "out of memory");
            return -1;
        }
    }
    for (int i = 0; i < nparams; i++) {
        if (!params[i]) {
            t->final.params[i] = NULL;
            continue;
        }
        size_t len = strlen(params[i]) + 1;
        memcpy(p, params[i], len);
        t->final.params[i] = p;
        p += len;
    }
    t->final.sql = sql;
    t->final.n = nparams;
    t->final.zero_means_lost = zero_means_lost;
    return 0;
}

/* The fence of a transaction that belongs to a work item: the session row
 * (alive?) and the item's work row with its claim's token, in one
 * statement. A row that an operator's cancel, a timeout's takeover or a
 * re-claim deleted is not there: nothing of ours commits. Only the work
 * row is locked KEY SHARE until COMMIT: a DELETE of it waits for our
 * COMMIT, and so does ending the session, whose DELETE cascades to its
 * work rows. Not the session row too: every slot's item shares it, and
 * a row KEY SHARE-locked by many transactions at once is a new MultiXact
 * per locker, which slows the fence and the release down as slots are
 * added. */
/* Both fences fail by raising, never by answering no row: one divided by
 * the count of live rows they found is 22012 when there is none. The
 * error aborts the transaction, so nothing sent behind the fence in the
 * same flight runs, COMMIT included (first_failure reads it back as the
 * fence's failure). */
#define FENCE_ITEM_SQL                                                                       \
    "SELECT 1 / count(*) FROM (SELECT 1 FROM sessions s JOIN work w "                        \
    "ON w.session_id = s.session_id WHERE s.session_id = $1 AND s.deadline > now() "         \
    "AND w.machine_id = $2 AND w.process = $3 AND w.token = $4 "                             \
    "AND (w.deadline IS NULL OR w.deadline > now()) FOR KEY SHARE OF w) AS live"
/* A loop's run: its row locked FOR SHARE (not KEY SHARE: a takeover
 * changes no key, so only a SHARE lock makes its UPDATE wait for our
 * COMMIT). One host's run locks it, so no MultiXact grows. The session
 * row is read, not locked: the loop row is what a new holder must write. */
#define FENCE_LOOP_SQL                                                                       \
    "SELECT 1 / count(*) FROM (SELECT 1 FROM sessions s JOIN loops l "                       \
    "ON l.session_id = s.session_id WHERE s.session_id = $1 AND s.deadline > now() "         \
    "AND l.name = $2 AND l.token = $3 FOR SHARE OF l) AS live"
#define FENCE_SESSION_SQL                                                                    \
    "SELECT 1 / count(*) FROM (SELECT 1 FROM sessions WHERE session_id = $1 "                \
    "AND deadline > now() FOR KEY SHARE) AS live"

static const char *fence_of(const tx *t, const char **params) {
    params[0] = session_id(t->sess);
    if (t->fence == TX_FENCE_LOOP) {
        params[1] = t->process;
        params[2] = t->token;
        return FENCE_LOOP_SQL;
    }
    params[1] = t->machine;
    params[2] = t->process;
    params[3] = t->token;
    return t->fence == TX_FENCE_ITEM ? FENCE_ITEM_SQL : FENCE_SESSION_SQL;
}

/* Why a fence failed, asked outside any transaction (the failed one was
 * rolled back), on the failure path only: sql's first column says whether
 * the session is live. The answer, with its row to read; NULL when the
 * question failed or the session is dead (e set then). */
static PGresult *ask_why_lost(tx *t, const char *sql, int n, const char *const *params, tx_error *e) {
    PGresult *r = PQexecParams(t->conn, sql, n, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1) {
        flight_error(e, t->conn, r);
        PQclear(r);
        return NULL;
    }
    if (strcmp(PQgetvalue(r, 0, 0), "t") != 0) {
        PQclear(r);
        session_lose(t->sess, "session row gone or past its deadline");
        tx_error_set(e, TXE_SESSION_EXPIRED, "session expired");
        return NULL;
    }
    return r;
}

/* The item fence failed: the session died, or the lock was taken away,
 * and then how (the event recorded for the claim's token). */
static void item_lost(tx *t, tx_error *e) {
    const char *params[] = {session_id(t->sess), t->machine, t->process, t->token};
    PGresult *r = ask_why_lost(
        t,
        "SELECT (SELECT deadline > now() FROM sessions WHERE session_id = $1) AS live, "
        "(SELECT 'timeout after ' || timeout_seconds::TEXT || 's' FROM work "
        " WHERE machine_id = $2 AND process = $3 AND token = $4 AND deadline <= now()) AS timed_out, "
        "(SELECT event || coalesce(': ' || cause, '') FROM work_history "
        " WHERE machine_id = $2 AND process = $3 AND token = $4 AND event <> 'Started' "
        " ORDER BY occurred_at DESC LIMIT 1) AS ended, "
        "(SELECT count(*) FROM work WHERE machine_id = $2 AND process = $3) AS held",
        4, params, e);
    if (!r) return;
    const char *why;
    char buf[600];
    if (!PQgetisnull(r, 0, 1)) {
        why = PQgetvalue(r, 0, 1);
    } else if (!PQgetisnull(r, 0, 2)) {
        const char *ended = PQgetvalue(r, 0, 2);
        if (!strncmp(ended, "Abandoned", 9)) why = "taken over (its session was ended)";
        else if (!strncmp(ended, "Failed: timeout after", 21)) why = ended + 8;
        else if (!strncmp(ended, "Canceled: canceled by an operator", 33)) why = ended + 10;
        else {
            snprintf(buf, sizeof buf, "already decided (%s)", ended);
            why = buf;
        }
    } else {
        why = strcmp(PQgetvalue(r, 0, 3), "0") != 0 ? "taken over by another claim"
                                                    : "taken over (the lock was released)";
    }
    tx_error_set(e, TXE_LOST, "lost: the lock on %s %s was taken away: %s", t->machine, t->process,
                 why);
    PQclear(r);
}

/* A loop's fence failed: the session died, or the hold is no longer this
 * one (released, or taken by another session after ours was given up). */
static void hold_lost(tx *t, tx_error *e) {
    const char *params[] = {session_id(t->sess), t->process, t->token};
    PGresult *r = ask_why_lost(t,
                               "SELECT (SELECT deadline > now() FROM sessions WHERE session_id = $1) AS live, "
                               "(SELECT session_id IS NOT NULL AND session_id <> $1 FROM loops "
                               " WHERE name = $2) AS taken",
                               3, params, e);
    if (!r) return;
    tx_error_set(e, TXE_LOST, "lost: the hold on loop %s was taken away: %s", t->process,
                 !strcmp(PQgetvalue(r, 0, 1), "t") ? "taken over by another session" : "released");
    PQclear(r);
}

/* Borrows t's connection, tagged with t's session: if the session passes
 * its local deadline while t waits on the server, the pool cuts it
 * (pool_cut_owned). The session is checked after the tag too, so a cut
 * that came between the check and the tag is not missed. */
static int borrow(tx *t, tx_error *e) {
    char err[512];
    t->conn = NULL;
    t->prep = NULL;
    if (t->sess && !session_alive(t->sess)) {
        tx_error_set(e, TXE_SESSION_EXPIRED, "session expired");
        return -1;
    }
    if (!(t->conn = pool_get(t->pool, POOL_WAIT_S, err, sizeof err))) {
        tx_error_set(e, TXE_CONNECTION, "%s", err);
        return -1;
    }
    t->prep = pool_lend_to(t->pool, t->conn, t->sess);
    if (!t->sess || session_alive(t->sess)) return 0;
    pool_put(t->pool, t->conn);
    t->conn = NULL;
    t->prep = NULL;
    tx_error_set(e, TXE_SESSION_EXPIRED, "session expired");
    return -1;
}

int tx_begin(tx *t, pool *p, session *sess, tx_error *e) {
    return tx_begin_item(t, p, sess, NULL, e);
}

int tx_begin_item(tx *t, pool *p, session *sess, const tx_item *item, tx_error *e) {
    t->pool = p;
    t->sess = sess;
    t->conn = NULL;
    t->prep = NULL;
    t->state = TX_OVER;
    t->refreshed = 0;
    t->final.sql = NULL;
    t->final.heap = NULL;
    t->final_result = NULL;
    t->pending = NULL;
    t->npending = 0;
    t->flights = 0;
    t->fence = !item ? TX_FENCE_SESSION : item->loop ? TX_FENCE_LOOP : TX_FENCE_ITEM;
    if (item) {
        snprintf(t->machine, sizeof t->machine, "%s", item->loop ? "" : item->machine);
        snprintf(t->process, sizeof t->process, "%s", item->process);
        snprintf(t->token, sizeof t->token, "%s", item->token);
    }
    if (borrow(t, e) < 0) return -1;
    t->state = TX_READY;
    return 0;
}

/* The flight's answers, in order: the first failure is the flight's (the
 * server skipped what came after it). -1 when all went well; else the
 * index of the failed step, with e set. A fence that found no live row
 * fails with e->kind TXE_SESSION_EXPIRED (the caller finds out more). A
 * connection lost in a flight that carried COMMIT (always its last step)
 * leaves its outcome unknown, whichever answer was the first missing:
 * the server may have run everything, COMMIT included, before the
 * connection went. So does a server that answers "result is ambiguous"
 * (40003, txerror.h). */
static int first_failure(tx *t, step *s, int n, tx_error *e) {
    for (int i = 0; i < n; i++) {
        PGresult *r = s[i].r;
        if (!flight_ok(r)) {
            flight_error(e, t->conn, r);
            const char *st = e->sqlstate;
            /* 26000: a statement we sent by name is gone (a script's
             * DEALLOCATE); 0A000: the schema changed under a cached plan.
             * Prepared afresh, the next attempt runs. */
            if ((s[i].kind == STEP_FENCE || s[i].kind == STEP_FINAL || s[i].cached) &&
                (!strcmp(st, "26000") || !strcmp(st, "0A000"))) {
                prepared_forget(t->prep);
                e->stale_statement = 1;
            }
            if (s[i].deferred) {
                e->deferred = 1;
                size_t at = strlen(e->message);
                snprintf(e->message + at, sizeof e->message - at, " (in a statement deferred with "
                         "tx:defer: %.120s)", s[i].sql);
            }
            if (s[i].kind == STEP_FENCE && !strcmp(st, "22012"))
                tx_error_set(e, TXE_SESSION_EXPIRED, "session expired");
            else if (s[i].kind == STEP_FINAL && t->final.zero_means_lost && !strcmp(st, "22012"))
                tx_error_set(e, TXE_LOST, "lost: the lock on %s %s is no longer held by this session",
                             t->final.params[0], t->final.params[1]);
            if (s[n - 1].kind == STEP_COMMIT) tx_error_commit_failed(e);
            return i;
        }
    }
    return -1;
}

/* A flight failed at step bad. Returns 1 when it is worth flying again
 * on a fresh connection: nothing had begun, and the connection (an idle
 * pooled one, say, whose server restarted) broke; once per transaction.
 * Else settles t. */
static int settle_failure(tx *t, const step *s, int bad, tx_error *e) {
    if (!begun(t) && !t->refreshed && bad >= 0 && s[bad].kind == STEP_BEGIN &&
        e->kind == TXE_CONNECTION && !e->outcome_unknown && PQstatus(t->conn) != CONNECTION_OK) {
        t->refreshed = 1;
        pool_put(t->pool, t->conn);
        if (borrow(t, e) < 0) {
            doom(t, e);
            return 0;
        }
        return 1;
    }
    switch (s[bad].kind) {
    case STEP_FENCE:
        if (e->kind == TXE_SESSION_EXPIRED) {
            /* The fence found no live row: roll back what rode with it,
             * then learn why outside the transaction. */
            if (PQstatus(t->conn) == CONNECTION_OK && PQtransactionStatus(t->conn) != PQTRANS_IDLE)
                PQclear(PQexec(t->conn, "ROLLBACK"));
            if (t->fence == TX_FENCE_LOOP) hold_lost(t, e);
            else if (t->fence == TX_FENCE_ITEM) item_lost(t, e);
            else session_lose(t->sess, "session row gone or past its deadline");
        }
        /* fall through */
    case STEP_BEGIN:
    case STEP_PENDING:
    case STEP_FINAL:
        doom(t, e);
        break;
    case STEP_COMMIT:
        tx_rollback(t);
        break;
    case STEP_STMT:
        t->state = TX_FAILED; /* (BEGIN and the fence passed before it) */
        break;
    }
    return 0;
}

PGresult *tx_conn_exec(PGconn *c, const char *sql, int nparams, const char *const *params,
                       const int *lengths, const int *formats, tx_error *e) {
    if (flight_check_binary(c, sql, nparams, formats, e) < 0) return NULL;
    PGresult *r = PQexecParams(c, sql, nparams, NULL, params, lengths, formats, 0);
    if (flight_ok(r)) return r;
    flight_error(e, c, r);
    PQclear(r);
    return NULL;
}

/* Whether statement result r ended the transaction: the connection is
 * idle, or the command tag says so (COMMIT AND CHAIN leaves it in a new
 * transaction that never read the session row). ROLLBACK AND CHAIN is
 * left to the callers' refusal: its tag is also that of ROLLBACK TO
 * SAVEPOINT, which keeps the transaction. */
static int ended_transaction(PGconn *c, PGresult *r) {
    const char *tag = PQcmdStatus(r);
    return PQtransactionStatus(c) == PQTRANS_IDLE || !strcmp(tag, "COMMIT") ||
           !strcmp(tag, "PREPARE TRANSACTION");
}

PGresult *tx_exec(tx *t, const char *sql, int nparams, const char *const *params, tx_error *e) {
    return tx_exec_params(t, sql, nparams, params, NULL, NULL, e);
}

long tx_run(tx *t, const char *sql, int nparams, const char *const *params, PGresult **out,
            tx_error *e) {
    PGresult *r = tx_exec(t, sql, nparams, params, e);
    if (!r) return -1;
    long rows = PQresultStatus(r) == PGRES_TUPLES_OK ? PQntuples(r) : atol(PQcmdTuples(r));
    if (out) *out = r;
    else PQclear(r);
    return rows;
}

PGresult *tx_exec_params(tx *t, const char *sql, int nparams, const char *const *params,
                         const int *lengths, const int *formats, tx_error *e) {
    if (still_open(t, e) < 0) return NULL;
    if (flight_check_binary(t->conn, sql, nparams, formats, e) < 0) {
        refused(t);
        return NULL;
    }
    for (;;) {
        step s[FLIGHT_MAX];
        const char *fence_params[4];
        int final_at, n = add_head(t, s, fence_params, &final_at, e);
        if (n < 0) return NULL;
        const char *name;
        int cached;
        /* Prepared before the flight. Outside the transaction when it has
         * not begun; inside, a statement that does not parse aborts it,
         * as it would have anyway. */
        if (prepare(t, sql, nparams, &name, &cached, e) < 0) {
            refused(t);
            return NULL;
        }
        s[n++] = (step){.kind = STEP_STMT, .sql = sql, .name = name, .n = nparams, .params = params,
                        .lengths = lengths, .formats = formats, .cached = cached};
        flight_fly(t->conn, s, n);
        int bad = first_failure(t, s, n, e);
        if (bad >= 0) {
            flight_clear(s, n);
            if (settle_failure(t, s, bad, e)) continue;
            pending_flown(t);
            return NULL;
        }
        flown_well(t);
        pending_flown(t);
        if (t->final.sql) final_free(&t->final);
        PGresult *r = s[n - 1].r;
        s[n - 1].r = NULL;
        flight_clear(s, n - 1);
        if (ended_transaction(t->conn, r)) {
            /* The statement ended the transaction (a COMMIT or ROLLBACK that
             * got past the caller's check): the fence went with it, and
             * anything run on this connection now would autocommit, or run
             * in a chained transaction that never read the session row.
             * Close the tx so nothing more runs on it. */
            tx_error_set(e, TXE_CLOSED, "the statement ended the transaction (%s); its fence is gone, "
                         "so nothing more runs in it", PQcmdStatus(r));
            PQclear(r);
            tx_rollback(t);
            return NULL;
        }
        return r;
    }
}

int tx_commit(tx *t, tx_error *e) {
    if (still_open(t, e) < 0) return -1;
    if (failed(t)) {
        tx_error_set(e, TXE_CLOSED, "transaction aborted by an earlier error; it can only roll back");
        tx_rollback(t);
        return -1;
    }
    /* The database checked the session at the start of this transaction;
     * time has passed since. The local deadline passes first, so checking
     * it here keeps a late commit from landing after the database's. */
    if (t->sess && !session_alive(t->sess)) {
        tx_error_set(e, TXE_SESSION_EXPIRED, "session expired");
        tx_rollback(t);
        return -1;
    }
    /* Nothing ran, and no final or deferred statement waits: nothing to
     * commit. */
    if (!begun(t) && !t->final.sql && !has_deferred(t)) {
        tx_rollback(t);
        return 0;
    }
    /* One flight: BEGIN and the fence if nothing ran yet (a failed fence
     * raises, so COMMIT cannot run behind it), the final statement, and
     * COMMIT. Never flown again on a fresh connection: a connection lost
     * with COMMIT in flight leaves the outcome unknown (first_failure). A
     * server error means it rolled back. Callers that must know (a work
     * decision) look in the database before they retry. */
    step s[FLIGHT_MAX];
    const char *fence_params[4];
    int final_at, n = add_head(t, s, fence_params, &final_at, e);
    if (n < 0) return -1;
    s[n++] = (step){.kind = STEP_COMMIT, .sql = "COMMIT"};
    flight_fly(t->conn, s, n);
    int bad = first_failure(t, s, n, e);
    if (bad >= 0) {
        flight_clear(s, n);
        settle_failure(t, s, bad, e);
        return -1;
    }
    if (final_at >= 0) {
        t->final_result = s[final_at].r;
        s[final_at].r = NULL;
    }
    flight_clear(s, n);
    final_free(&t->final);
    pending_free(t);
    metrics_tx_committed();
    t->state = TX_OVER;
    pool_put(t->pool, t->conn);
    t->conn = NULL;
    return 0;
}

void tx_rollback(tx *t) {
    final_free(&t->final);
    pending_free(t);
    PQclear(t->final_result);
    t->final_result = NULL;
    if (t->state != TX_DOOMED) t->state = TX_OVER; /* a doom outlives the rollback */
    if (!t->conn) return;
    if (PQstatus(t->conn) == CONNECTION_OK && PQtransactionStatus(t->conn) != PQTRANS_IDLE)
        PQclear(PQexec(t->conn, "ROLLBACK"));
    pool_put(t->pool, t->conn);
    t->conn = NULL;
}
