/* txflight.h -- a transaction's statements on the wire (private to tx.c).
 *
 * A flight: several statements sent before any answer is read (libpq's
 * pipeline mode) and their answers read back in order; a failed answer
 * read into a tx_error; and the check a statement with binary parameters
 * gets before it flies. Nothing here knows a transaction's state: tx.c
 * decides what flies and what a failure does to the transaction. */
#ifndef BMDB_TXFLIGHT_H
#define BMDB_TXFLIGHT_H

#include <libpq-fe.h>

#include "txerror.h"

/* What a step is to its transaction: tx.c reads a failure by it. */
typedef enum { STEP_BEGIN, STEP_FENCE, STEP_PENDING, STEP_FINAL, STEP_STMT, STEP_COMMIT } step_kind;

typedef struct step {
    step_kind kind;
    const char *sql, *name; /* name: prepared on this connection, else NULL */
    int n;
    const char *const *params;
    const int *lengths, *formats;
    int cached;             /* name was prepared by an earlier statement */
    int deferred;           /* the caller's, queued by tx_defer */
    PGresult *r;            /* the answer; NULL when none came */
} step;

/* Sends the steps in one pipeline and reads every answer into s[i].r.
 * Without pipeline mode, they run one by one, up to the first failure. */
void flight_fly(PGconn *c, step *s, int n);
/* Whether answer r is a success (NULL is not). */
int flight_ok(const PGresult *r);
/* PQclears every answer. */
void flight_clear(step *s, int n);

/* Fills e from a failed result or connection (pqerr.h): TXE_SQL with the
 * server's fields, or TXE_CONNECTION. */
void flight_error(tx_error *e, PGconn *conn, const PGresult *res);

/* Whether any parameter is binary (format 1). */
int flight_has_binary(int n, const int *formats);
/* A binary parameter the statement does not read as bytea is refused
 * before the statement runs (one round trip, only when there is one):
 * 0, or -1 with e set. */
int flight_check_binary(PGconn *c, const char *sql, int n, const int *formats, tx_error *e);

#endif
