/* tx.h -- one SERIALIZABLE transaction of a session, with its fence.
 *
 * tx_begin() only borrows a connection (and checks the session locally).
 * BEGIN ISOLATION LEVEL SERIALIZABLE and the fence, a read of the session
 * row (and of the item's work row) that fails by raising when it is not
 * alive, ride in front of the transaction's first statement, or of its
 * COMMIT: a transaction of a dead session can therefore never commit
 * (host/README.md, guarantee 2). tx_commit() checks the local deadline
 * once more before COMMIT. Retrying 40001/40P01 is the caller's loop;
 * tx_retry_delay() is its one policy. */
#ifndef BMDB_TX_H
#define BMDB_TX_H

#include <libpq-fe.h>

#include "pool.h"
#include "session.h"
#include "txerror.h"


/* The statement that rides with COMMIT (tx_set_final): its parameters are
 * copied, since the caller's strings may be gone by then. */
#define TX_FINAL_MAX_PARAMS 8
typedef struct tx_final {
    const char *sql;   /* NULL: none; a static string of the host's */
    int n;
    const char *params[TX_FINAL_MAX_PARAMS];
    int zero_means_lost; /* its 22012 (a division by a count of zero) means
                          * the work lock is gone: TXE_LOST */
    char *heap;          /* the copies, when they do not fit inline */
    char buf[256];
} tx_final;

/* Where a transaction is in its life. The calls on a tx answer by its
 * state, and only the functions of tx.c move it:
 *
 *               tx_begin           a flight goes well
 *      OVER ─────────────▶ READY ───────────────────────▶ BEGUN
 *                            │   ╲ a statement fails         │
 *     a statement is refused │    ╲ in its flight            │ a statement fails
 *     before it flies        ▼     ╲                         ▼
 *                     FAILED_UNBEGUN ──────────────────▶ FAILED
 *                                 a flight that passes BEGIN
 *
 *   tx_failure_undone (a batch queued ROLLBACK TO SAVEPOINT): FAILED →
 *   BEGUN, FAILED_UNBEGUN → READY.
 *   tx_init_detached → DETACHED: no connection; it only queues, never
 *   begins, and its statements move to another tx (tx_adopt).
 *   Any open state → OVER: tx_commit, tx_rollback, a failed COMMIT, a
 *   statement that ended the transaction itself.
 *   Any open state → DOOMED: the fence, BEGIN, a queued or the final
 *   statement failed, or no connection could be had for a first flight
 *   flown again: over, and every later call answers t->doom. tx_rollback
 *   leaves a doomed tx doomed; tx_begin starts afresh.
 *
 * A failure and BEGIN are independent facts for a moment: a statement can
 * be refused before anything went out (its PREPARE failed, or a binary
 * parameter it cannot take), and then the next statement still brings
 * BEGIN and the fence with it. So each of the four combinations is a
 * state: each answers the next statement and the commit differently. */
typedef enum {
    TX_OVER = 0,       /* never begun, committed or rolled back: "closed" */
    TX_DOOMED,         /* over; every later call gets the same error */
    TX_DETACHED,       /* queues deferred statements only (no connection) */
    TX_READY,          /* a connection is borrowed; nothing sent yet */
    TX_FAILED_UNBEGUN, /* a statement was refused before BEGIN went out:
                        * only rollback is left */
    TX_BEGUN,          /* BEGIN and the fence went out and passed */
    TX_FAILED          /* begun, and a statement failed: only rollback is
                        * left (on the server too, unless the host itself
                        * refused the statement) */
} tx_state;

/* What a transaction's fence checks besides the session being alive. */
typedef enum tx_fence {
    TX_FENCE_SESSION, /* the session row alone */
    TX_FENCE_ITEM,    /* the work item's row with its claim's token */
    TX_FENCE_LOOP,    /* the loop's row with its hold's token (bmdb.loop) */
} tx_fence;

typedef struct tx {
    pool *pool;
    PGconn *conn;
    struct prepared *prep; /* conn's prepared statements (pool.h) */
    session *sess;   /* NULL: no fence (housekeeping without a session) */
    tx_state state;
    /* Two facts about the transaction that are not states, since they do
     * not change which calls it takes: */
    tx_fence fence;  /* what the fence reads, fixed by tx_begin_item */
    int refreshed;   /* the one flight again on a fresh connection (a first
                      * flight that found its connection broken) is spent */
    char machine[40], process[64], token[40]; /* the item's, or the loop's
                                               * name (process) and token */
    tx_final final;
    /* Statements that ride in front of the next flight, after BEGIN and
     * the fence, in the order queued: the host's static SQL (a batch's
     * savepoints) and the caller's deferred statements (tx_defer). The
     * array is allocated at the first, and freed by tx_rollback. */
    struct tx_pending *pending;
    int npending;
    unsigned long flights; /* flights flown: a mark older than the last
                            * one names nothing still queued */
    PGresult *final_result; /* the final statement's answer, after COMMIT */
    tx_error doom;   /* why it is DOOMED */
} tx;

/* The state's questions, for readers outside tx.c. Open: takes statements
 * (DETACHED, READY, BEGUN and the two FAILED states). */
int tx_is_open(const tx *t);
int tx_doomed(const tx *t);
/* The error that doomed t, or NULL when it is not doomed. */
const tx_error *tx_doom(const tx *t);
/* The caller queued (tx_pend) what undoes t's failed statement, a
 * ROLLBACK TO SAVEPOINT: t may take statements and commit again. */
void tx_failure_undone(tx *t);

/* The work item a body's transaction belongs to: its fence also checks
 * that the item's work row with this claim's token still exists. With
 * loop set, a loop's run instead: process is the loop's name, machine is
 * unused, and the fence checks that the loop's row still names this
 * session and this hold's token. */
typedef struct tx_item {
    const char *machine, *process, *token;
    int loop;
} tx_item;

/* sess may be NULL for housekeeping transactions. Only borrows a
 * connection and checks the session locally (READY): BEGIN and the fence
 * are sent with the transaction's first statement (one round trip), so a
 * dead session or a lost lock is reported by that statement, or by
 * tx_commit. 0, or -1 with
 * e set; t->sess is set either way, so a caller holding a reference for
 * the tx releases it the same way on both paths. */
int tx_begin(tx *t, pool *p, session *sess, tx_error *e);
/* tx_begin fenced by item too: TXE_LOST, naming why, when its lock was
 * taken away (timeout, canceled by an operator, taken over). */
int tx_begin_item(tx *t, pool *p, session *sess, const tx_item *item, tx_error *e);
/* Makes sql the statement sent in the same round trip as COMMIT (or
 * before the next statement, if one follows): for a statement whose only
 * possible failure is an error, which then keeps COMMIT from running.
 * Parameters are copied. With zero_means_lost, its division by zero
 * (22012) is reported as TXE_LOST. 0, or -1 with e set. */
int tx_set_final(tx *t, const char *sql, int nparams, const char *const *params,
                 int zero_means_lost, tx_error *e);
/* At most this many statements wait for a flight; tx_defer sends at once
 * rather than fill the last few, which stay free for tx_pend. */
#define TX_PENDING_MAX 128
#define TX_DEFER_MAX (TX_PENDING_MAX - 8)

/* Where a queued statement stands, for taking it back. */
typedef struct tx_mark {
    unsigned long flight;
    int at;
} tx_mark;

/* Queues sql (a static string of the host's) to ride in front of the
 * next flight, and says where it stands. */
tx_mark tx_pend(tx *t, const char *sql);
/* Takes back the statement at m (with and_after, everything queued after
 * it too) when it has not gone out: 1. 0 when a flight took it. So a
 * savepoint nobody sent a statement in costs nothing. */
int tx_unpend(tx *t, tx_mark m, int and_after);
/* Drops every statement still queued (a failed member's deferred ones). */
void tx_unpend_all(tx *t);
/* Queues one of the caller's statements to ride with the next flight
 * (the next statement, or COMMIT) without waiting for its answer: its
 * text and parameters are copied, and it is prepared now (an error in
 * its text is raised here). If it fails when it runs, the transaction is
 * doomed with its error, which names it as deferred: the statement then
 * in flight, or the commit, reports it, and nothing of the transaction
 * commits. With the queue full it runs at once. 0, or -1 with e set;
 * on a detached tx, 1 (nothing done) where it would need a connection:
 * a binary parameter to check, or a full queue. */
int tx_defer(tx *t, const char *sql, int nparams, const char *const *params, const int *lengths,
             const int *formats, tx_error *e);
/* A transaction without a connection that only queues deferred
 * statements (a batch member's until it sends one of its own, batch.h):
 * tx_defer copies them without preparing them (they are prepared when
 * they fly; an error in one's text then dooms the transaction it flies
 * in), and tx_adopt hands them on. sess is only looked at, not held.
 * tx_rollback frees what it still queues. */
void tx_init_detached(tx *t, session *sess);
/* Moves every statement queued in src to the end of dst's queue, in
 * order; one that finds dst's queue full runs at once (as tx_defer's
 * would), so dst has a connection (it is not a detached tx). src is left
 * empty. 0, or -1 with e set. */
int tx_adopt(tx *dst, tx *src, tx_error *e);
/* Runs one statement with text parameters (NULL entries are SQL NULL).
 * Returns the result (caller PQclear()s it), or NULL with e set; after an
 * error the transaction is aborted and only tx_rollback() is left. */
PGresult *tx_exec(tx *t, const char *sql, int nparams, const char *const *params, tx_error *e);
/* tx_exec for callers that want a count: rows returned or affected, or -1
 * with e set. With out, the result is handed over (caller PQclear()s it). */
long tx_run(tx *t, const char *sql, int nparams, const char *const *params, PGresult **out,
            tx_error *e);
/* tx_exec with PQexecParams' lengths and formats (1 = binary), for
 * parameters that text cannot carry (a bytea with NUL bytes). A statement
 * that ends the transaction closes the tx and fails with TXE_CLOSED. */
PGresult *tx_exec_params(tx *t, const char *sql, int nparams, const char *const *params,
                         const int *lengths, const int *formats, tx_error *e);
/* The same on a bare connection, outside any tx. A binary parameter the
 * statement does not read as bytea is refused before it runs. */
PGresult *tx_conn_exec(PGconn *c, const char *sql, int nparams, const char *const *params,
                       const int *lengths, const int *formats, tx_error *e);
/* Sends the final statement (if any) and COMMIT in one round trip; the
 * final's answer stays in t->final_result until tx_rollback (which any
 * owner of a tx calls once, committed or not). */
int tx_commit(tx *t, tx_error *e);
/* Safe to call on a closed transaction. Returns the connection and frees
 * what the tx held. */
void tx_rollback(tx *t);

/* Seconds to wait before retry number attempt (1-based): jittered,
 * growing, capped; negative once attempts are exhausted. */
double tx_retry_delay(int attempt);


#endif
