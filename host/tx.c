/* tx.c -- one SERIALIZABLE transaction of a session, with its fence.
 *
 * Every BMDB transaction runs at SERIALIZABLE, as CockroachDB always does:
 * at READ COMMITTED a claim can read a machine whose completion committed a
 * moment earlier and lock it again. The fence is a locking read of the
 * session row inside the same transaction: if a collector deletes the row,
 * or its deadline has passed by the transaction's now(), nothing of ours
 * commits, and a collector or takeover waits for our COMMIT to finish.
 * The local deadline is checked again right before COMMIT, because it
 * always passes before the database's (session.c). The guarantees this
 * keeps, and who else keeps them: host/README.md. */
#include "tx.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lifecycle.h"
#include "metrics.h"
#include "prepared.h"
#include "pqerr.h"

void tx_error_set(tx_error *e, tx_error_kind kind, const char *fmt, ...) {
    memset(e, 0, sizeof *e);
    e->kind = kind;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
}

/* Fill e from a failed result or connection (pqerr.h). */
static void tx_error_from_result(tx_error *e, PGconn *conn, const PGresult *res) {
    pq_error pe;
    pq_error_read(&pe, conn, res);
    memset(e, 0, sizeof *e);
    e->kind = pe.connection_lost ? TXE_CONNECTION : TXE_SQL;
    memcpy(e->sqlstate, pe.sqlstate, sizeof e->sqlstate);
    memcpy(e->message, pe.message, sizeof e->message);
    memcpy(e->detail, pe.detail, sizeof e->detail);
    memcpy(e->hint, pe.hint, sizeof e->hint);
}

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

static PGresult *exec_params(PGconn *c, const char *sql, int n, const char *const *params) {
    return PQexecParams(c, sql, n, NULL, params, NULL, NULL, 0);
}

/* Reads one statement's answer in pipeline mode: its result, then the NULL
 * that ends it. */
static PGresult *pipeline_result(PGconn *c) {
    PGresult *r = PQgetResult(c), *extra;
    if (r && PQresultStatus(r) != PGRES_PIPELINE_SYNC)
        while ((extra = PQgetResult(c))) PQclear(extra);
    return r;
}

/* BEGIN, then fence_sql (if any), sent in ONE round trip: pipeline mode
 * (libpq >= 14) sends both before it reads an answer, and the server runs
 * them in order. Returns the BEGIN's result and sets *fence to the
 * fence's (NULL when it never ran). */
static PGresult *send_begin(tx *t, const char *fence_sql, int n, const char *const *params,
                            PGresult **fence) {
    static const char begin_sql[] = "BEGIN ISOLATION LEVEL SERIALIZABLE";
    PGconn *c = t->conn;
    *fence = NULL;
    /* Prepared before the pipeline starts: a PREPARE's answer must be read
     * before anything else is sent. Once per connection. */
    const char *fence_name = fence_sql ? prepared_name(t->prep, c, fence_sql, n) : NULL;
    if (!fence_sql || !PQenterPipelineMode(c)) {
        PGresult *r = PQexec(c, begin_sql);
        if (fence_sql && PQresultStatus(r) == PGRES_COMMAND_OK)
            *fence = prepared_exec(t->prep, c, fence_sql, n, params, NULL, NULL, NULL);
        return r;
    }
    PGresult *begin = NULL;
    if (PQsendQueryParams(c, begin_sql, 0, NULL, NULL, NULL, NULL, 0) &&
        (fence_name ? PQsendQueryPrepared(c, fence_name, n, params, NULL, NULL, 0)
                    : PQsendQueryParams(c, fence_sql, n, NULL, params, NULL, NULL, 0)) &&
        PQpipelineSync(c)) {
        begin = pipeline_result(c);
        *fence = pipeline_result(c);
        PGresult *sync;
        while ((sync = PQgetResult(c)) && PQresultStatus(sync) != PGRES_PIPELINE_SYNC) PQclear(sync);
        PQclear(sync);
    }
    PQexitPipelineMode(c); /* fails only on a broken connection, which the caller sees */
    return begin;
}

/* BEGIN on a borrowed connection, with the fence in the same flight. An
 * idle pooled connection may have died (server restart); that is worth
 * exactly one fresh connection. 0 with *fence set when a fence was sent. */
static int open_on_fresh_conn(tx *t, const char *fence_sql, int n, const char *const *params,
                              PGresult **fence, tx_error *e) {
    char err[512];
    for (int tries = 0; tries < 2; tries++) {
        t->conn = pool_get(t->pool, POOL_WAIT_S, err, sizeof err);
        if (!t->conn) {
            tx_error_set(e, TXE_CONNECTION, "%s", err);
            return -1;
        }
        t->prep = pool_prepared(t->pool, t->conn);
        PGresult *r = send_begin(t, fence_sql, n, params, fence);
        int ok = PQresultStatus(r) == PGRES_COMMAND_OK;
        if (!ok) tx_error_from_result(e, t->conn, r);
        PQclear(r);
        if (ok) return 0;
        PQclear(*fence);
        *fence = NULL;
        int broken = PQstatus(t->conn) != CONNECTION_OK;
        if (!broken && PQtransactionStatus(t->conn) != PQTRANS_IDLE)
            PQclear(PQexec(t->conn, "ROLLBACK"));
        pool_put(t->pool, t->conn);
        t->conn = NULL;
        if (!broken) return -1;
    }
    return -1;
}

/* The fence of a transaction that belongs to a work item: the session row
 * and the item's work row with its claim's token, in one statement, both
 * locked KEY SHARE until COMMIT. A row that an operator's cancel, a
 * timeout's takeover or a re-claim deleted is not there: nothing of ours
 * commits. And a DELETE of it waits for our COMMIT, as the session's does. */
#define FENCE_ITEM_SQL                                                                     \
    "SELECT 1 FROM sessions s JOIN work w ON w.session_id = s.session_id "                 \
    "WHERE s.session_id = $1 AND s.deadline > now() AND w.machine_id = $2 "                \
    "AND w.process = $3 AND w.token = $4 AND (w.deadline IS NULL OR w.deadline > now()) " \
    "FOR KEY SHARE"
#define FENCE_SESSION_SQL \
    "SELECT 1 FROM sessions WHERE session_id = $1 AND deadline > now() FOR KEY SHARE"

/* Only when the item fence failed: why. The session died, or the lock was
 * taken away, and then how (the event recorded for the claim's token).
 * Fills e; the failure path pays this round trip, never the others. */
static void item_lost(tx *t, const tx_item *item, tx_error *e) {
    const char *params[] = {session_id(t->sess), item->machine, item->process, item->token};
    PGresult *r = exec_params(
        t->conn,
        "SELECT (SELECT deadline > now() FROM sessions WHERE session_id = $1) AS live, "
        "(SELECT 'timeout after ' || timeout_seconds::TEXT || 's' FROM work "
        " WHERE machine_id = $2 AND process = $3 AND token = $4 AND deadline <= now()) AS timed_out, "
        "(SELECT event || coalesce(': ' || cause, '') FROM work_history "
        " WHERE machine_id = $2 AND process = $3 AND token = $4 AND event <> 'Started' "
        " ORDER BY occurred_at DESC LIMIT 1) AS ended, "
        "(SELECT count(*) FROM work WHERE machine_id = $2 AND process = $3) AS held",
        4, params);
    if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1) {
        tx_error_from_result(e, t->conn, r);
        PQclear(r);
        return;
    }
    if (strcmp(PQgetvalue(r, 0, 0), "t") != 0) {
        PQclear(r);
        session_lose(t->sess, "session row gone or past its deadline");
        tx_error_set(e, TXE_SESSION_EXPIRED, "session expired");
        return;
    }
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
    tx_error_set(e, TXE_LOST, "lost: the lock on %s %s was taken away: %s", item->machine,
                 item->process, why);
    PQclear(r);
}

int tx_begin(tx *t, pool *p, session *sess, tx_error *e) {
    return tx_begin_item(t, p, sess, NULL, e);
}

int tx_begin_item(tx *t, pool *p, session *sess, const tx_item *item, tx_error *e) {
    memset(t, 0, sizeof *t);
    t->pool = p;
    t->sess = sess;
    if (sess && !session_alive(sess)) {
        tx_error_set(e, TXE_SESSION_EXPIRED, "session expired");
        return -1;
    }
    const char *params[] = {sess ? session_id(sess) : NULL, item ? item->machine : NULL,
                            item ? item->process : NULL, item ? item->token : NULL};
    const char *fence_sql = !sess ? NULL : item ? FENCE_ITEM_SQL : FENCE_SESSION_SQL;
    PGresult *r;
    if (open_on_fresh_conn(t, fence_sql, item ? 4 : 1, params, &r, e) < 0) return -1;
    t->open = 1;
    if (!sess) return 0;

    /* KEY SHARE, held until COMMIT: the heartbeat's UPDATE of the deadline
     * does not conflict with it, but the DELETE with which a collector or a
     * takeover ends an expired session does, so it waits for us. Without
     * the lock, a COMMIT of ours that stalls (network, fsync, a synchronous
     * standby) past the deadline could land after another host took our
     * work over, and SERIALIZABLE would see no conflict: the takeover only
     * READ the session row. With it, our commit is ordered before the
     * takeover, which then sees what we committed. On CockroachDB the
     * takeover's write to a row we read makes our commit fail instead.
     * A body's transaction checks its work row in the same statement,
     * and the statement travels with the BEGIN (open_on_fresh_conn). */
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        tx_error_from_result(e, t->conn, r);
        /* The fence went out by name; the server may have dropped it (a
         * script's DEALLOCATE). Prepared afresh, the next attempt runs. */
        if (!strcmp(e->sqlstate, "26000")) {
            prepared_forget(t->prep);
            e->stale_statement = 1;
        }
        PQclear(r);
        tx_rollback(t);
        return -1;
    }
    int live = PQntuples(r) == 1;
    PQclear(r);
    if (!live) {
        if (item) {
            item_lost(t, item, e);
        } else {
            session_lose(sess, "session row gone or past its deadline");
            tx_error_set(e, TXE_SESSION_EXPIRED, "session expired");
        }
        tx_rollback(t);
        return -1;
    }
    return 0;
}

/* The name of a parameter type, for a message. */
static const char *type_name(Oid t) {
    switch (t) {
    case 16: return "boolean";
    case 19: return "name";
    case 20: return "bigint";
    case 21: return "smallint";
    case 23: return "integer";
    case 25: return "text";
    case 114: return "json";
    case 700: return "real";
    case 701: return "double precision";
    case 1042: return "character";
    case 1043: return "character varying";
    case 1700: return "numeric";
    case 2950: return "uuid";
    case 3802: return "jsonb";
    default: return NULL;
    }
}

/* Binary parameters (format 1) carry what text cannot: a NUL byte. Only
 * bytea reads binary as the bytes themselves; text refuses a NUL and an
 * integer would read four bytes as a number. So when there is one, the
 * statement is described first and a binary parameter of any other type
 * is refused, naming it. 0, or -1 with e set. */
static int check_binary_params(PGconn *c, const char *sql, int n, const int *formats, tx_error *e) {
    int binary = 0;
    for (int i = 0; formats && i < n; i++) binary |= formats[i];
    if (!binary) return 0;
    PGresult *r = PQprepare(c, "", sql, n, NULL);
    if (PQresultStatus(r) == PGRES_COMMAND_OK) {
        PQclear(r);
        r = PQdescribePrepared(c, "");
    }
    if (PQresultStatus(r) != PGRES_COMMAND_OK) {
        tx_error_from_result(e, c, r);
        PQclear(r);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        Oid type = PQparamtype(r, i);
        if (!formats[i] || type == 17) continue;
        const char *name = type_name(type);
        char oid[32];
        snprintf(oid, sizeof oid, "type oid %u", type);
        tx_error_set(e, TXE_SQL, "parameter $%d holds a NUL byte, which only a bytea parameter can "
                     "take (the statement reads $%d as %s)", i + 1, i + 1, name ? name : oid);
        memcpy(e->sqlstate, "22021", 6); /* what the server says of a NUL in text */
        PQclear(r);
        return -1;
    }
    PQclear(r);
    return 0;
}

/* One statement on c, prepared through prep when it is not NULL. */
static PGresult *conn_exec(PGconn *c, struct prepared *prep, const char *sql, int nparams,
                           const char *const *params, const int *lengths, const int *formats,
                           tx_error *e) {
    if (check_binary_params(c, sql, nparams, formats, e) < 0) return NULL;
    int stale;
    PGresult *r = prepared_exec(prep, c, sql, nparams, params, lengths, formats, &stale);
    ExecStatusType st = PQresultStatus(r);
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) return r;
    tx_error_from_result(e, c, r);
    e->stale_statement = stale;
    PQclear(r);
    return NULL;
}

PGresult *tx_conn_exec(PGconn *c, const char *sql, int nparams, const char *const *params,
                       const int *lengths, const int *formats, tx_error *e) {
    return conn_exec(c, NULL, sql, nparams, params, lengths, formats, e);
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
    if (!t->open) {
        tx_error_set(e, TXE_CLOSED, "transaction is already over");
        return NULL;
    }
    PGresult *r = conn_exec(t->conn, t->prep, sql, nparams, params, lengths, formats, e);
    if (!r) {
        t->failed = 1;
        return NULL;
    }
    if (ended_transaction(t->conn, r)) {
        /* The statement ended the transaction (a COMMIT or ROLLBACK that got
         * past the caller's check): the fence went with it, and anything
         * run on this connection now would autocommit, or run in a chained
         * transaction that never read the session row. Close the tx so
         * nothing more runs on it. */
        tx_error_set(e, TXE_CLOSED, "the statement ended the transaction (%s); its fence is gone, "
                     "so nothing more runs in it", PQcmdStatus(r));
        PQclear(r);
        t->failed = 1;
        tx_rollback(t);
        return NULL;
    }
    return r;
}

int tx_commit(tx *t, tx_error *e) {
    if (!t->open) {
        tx_error_set(e, TXE_CLOSED, "transaction is already over");
        return -1;
    }
    if (t->failed) {
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
    PGresult *r = PQexec(t->conn, "COMMIT");
    int ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    if (!ok) {
        tx_error_from_result(e, t->conn, r);
        /* A server error to COMMIT means it rolled back; a lost connection
         * means we cannot know. Callers that must know (a work decision)
         * look in the database before they retry. */
        e->outcome_unknown = e->kind == TXE_CONNECTION;
    }
    PQclear(r);
    if (ok) metrics_tx_committed();
    t->open = 0;
    pool_put(t->pool, t->conn);
    t->conn = NULL;
    return ok ? 0 : -1;
}

void tx_rollback(tx *t) {
    if (!t->conn) {
        t->open = 0;
        return;
    }
    if (PQstatus(t->conn) == CONNECTION_OK && PQtransactionStatus(t->conn) != PQTRANS_IDLE)
        PQclear(PQexec(t->conn, "ROLLBACK"));
    t->open = 0;
    pool_put(t->pool, t->conn);
    t->conn = NULL;
}
