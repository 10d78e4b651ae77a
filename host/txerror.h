/* txerror.h -- what went wrong in a transaction, as the C core reports
 * it: tx.h's calls and the flights under them (txflight.h) fill one in,
 * lerror.c turns it into a Lua error object. A leaf: it includes nothing. */
#ifndef BMDB_TXERROR_H
#define BMDB_TXERROR_H

typedef enum {
    TXE_NONE = 0,
    TXE_SQL,              /* the server raised an error: sqlstate is set */
    TXE_CONNECTION,       /* no connection, or it broke mid-transaction */
    TXE_SESSION_EXPIRED,  /* the fence: the session is dead */
    TXE_CANCELED,         /* the host is shutting down */
    TXE_CLOSED,           /* the transaction is already over */
    TXE_LOST,             /* the work lock is no longer this session's */
    TXE_MEMORY            /* the host could not allocate what it needed */
} tx_error_kind;

typedef struct tx_error {
    tx_error_kind kind;
    char sqlstate[6];
    char message[1024];
    char detail[512];
    char hint[256];
    int stale_statement;  /* a cached prepared statement met a changed
                           * schema: running the transaction again works */
    int outcome_unknown;  /* COMMIT was sent but no answer came back: the
                           * transaction may or may not have committed */
    int deferred;         /* a statement queued with tx_defer failed */
} tx_error;

/* e cleared, with kind and a printf-style message. */
void tx_error_set(tx_error *e, tx_error_kind kind, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* e, the failure of a flight that carried COMMIT, says whether that
 * COMMIT may have landed: a connection lost before its answer, or the
 * server's own "result is ambiguous" (SQLSTATE 40003, CockroachDB's
 * answer when it cannot tell), both become TXE_CONNECTION with
 * outcome_unknown set, so every caller treats them alike. */
void tx_error_commit_failed(tx_error *e);

#endif
