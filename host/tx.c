/* tx.c -- one SERIALIZABLE transaction of a session, with its fence.
 *
 * Every BMDB transaction runs at SERIALIZABLE, as CockroachDB always does:
 * at READ COMMITTED a claim can read a machine whose completion committed a
 * moment earlier and lock it again. The fence is a read of the session row
 * inside the same transaction: if a collector deletes the row, or its
 * deadline has passed by the transaction's now(), nothing of ours commits.
 * The local deadline is checked again right before COMMIT, because it
 * always passes before the database's (session.c). */
#include "tx.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lifecycle.h"

static void copy_line(char *dst, size_t len, const char *src) {
    if (!src) src = "";
    size_t n = strcspn(src, "\n");
    if (n >= len) n = len - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

void tx_error_set(tx_error *e, tx_error_kind kind, const char *fmt, ...) {
    memset(e, 0, sizeof *e);
    e->kind = kind;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
}

void tx_error_from_result(tx_error *e, PGconn *conn, const PGresult *res) {
    memset(e, 0, sizeof *e);
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    if (state && PQstatus(conn) == CONNECTION_OK) {
        e->kind = TXE_SQL;
        snprintf(e->sqlstate, sizeof e->sqlstate, "%s", state);
        copy_line(e->message, sizeof e->message, PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY));
        copy_line(e->detail, sizeof e->detail, PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL));
        copy_line(e->hint, sizeof e->hint, PQresultErrorField(res, PG_DIAG_MESSAGE_HINT));
        return;
    }
    e->kind = TXE_CONNECTION;
    snprintf(e->message, sizeof e->message, "database connection lost: ");
    size_t n = strlen(e->message);
    copy_line(e->message + n, sizeof e->message - n, PQerrorMessage(conn));
}

int tx_error_retryable(const tx_error *e) {
    return e->kind == TXE_SQL &&
           (strcmp(e->sqlstate, "40001") == 0 || strcmp(e->sqlstate, "40P01") == 0);
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

/* BEGIN on a borrowed connection. An idle pooled connection may have died
 * (server restart); that is worth exactly one fresh connection. */
static int open_on_fresh_conn(tx *t, tx_error *e) {
    char err[512];
    for (int tries = 0; tries < 2; tries++) {
        t->conn = pool_get(t->pool, err, sizeof err);
        if (!t->conn) {
            tx_error_set(e, TXE_CONNECTION, "%s", err);
            return -1;
        }
        PGresult *r = PQexec(t->conn, "BEGIN ISOLATION LEVEL SERIALIZABLE");
        int ok = PQresultStatus(r) == PGRES_COMMAND_OK;
        if (!ok) tx_error_from_result(e, t->conn, r);
        PQclear(r);
        if (ok) return 0;
        int broken = PQstatus(t->conn) != CONNECTION_OK;
        pool_put(t->pool, t->conn);
        t->conn = NULL;
        if (!broken) return -1;
    }
    return -1;
}

int tx_begin(tx *t, pool *p, session *sess, tx_error *e) {
    memset(t, 0, sizeof *t);
    t->pool = p;
    t->sess = sess;
    if (sess && !session_alive(sess)) {
        tx_error_set(e, TXE_SESSION_EXPIRED, "session expired");
        return -1;
    }
    if (open_on_fresh_conn(t, e) < 0) return -1;
    t->open = 1;
    if (!sess) return 0;

    const char *params[] = {session_id(sess)};
    PGresult *r = exec_params(t->conn,
                              "SELECT 1 FROM sessions WHERE session_id = $1 AND deadline > now()",
                              1, params);
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        tx_error_from_result(e, t->conn, r);
        PQclear(r);
        tx_rollback(t);
        return -1;
    }
    int live = PQntuples(r) == 1;
    PQclear(r);
    if (!live) {
        session_lose(sess, "session row gone or past its deadline");
        tx_error_set(e, TXE_SESSION_EXPIRED, "session expired");
        tx_rollback(t);
        return -1;
    }
    return 0;
}

PGresult *tx_exec(tx *t, const char *sql, int nparams, const char *const *params, tx_error *e) {
    if (!t->open) {
        tx_error_set(e, TXE_CLOSED, "transaction is already over");
        return NULL;
    }
    PGresult *r = exec_params(t->conn, sql, nparams, params);
    ExecStatusType st = PQresultStatus(r);
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) return r;
    tx_error_from_result(e, t->conn, r);
    PQclear(r);
    t->failed = 1;
    return NULL;
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
