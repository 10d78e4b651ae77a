/* pqerr.h -- what libpq says went wrong, as one line of text.
 *
 * A leaf: it depends on libpq only. Every module that reports a server or
 * connection error reads it through here, so a message looks the same
 * whether it came from a slot's transaction, the heartbeat, a migration or
 * a report: "SQLSTATE message" for a server error, "database connection
 * lost: ..." when the connection broke. libpq's messages may span lines
 * and end in a newline; only the first line is kept. */
#ifndef BMDB_PQERR_H
#define BMDB_PQERR_H

#include <stddef.h>
#include <libpq-fe.h>

typedef struct pq_error {
    int connection_lost;  /* no SQLSTATE, or the connection is gone */
    int standby;          /* a read-only standby refused: hint is PQ_STANDBY_HINT */
    char sqlstate[6];     /* "" unless the server raised the error */
    char message[1024];
    char detail[512];
    char hint[256];
} pq_error;

/* What a read-only standby's refusal (25006 read-only transaction, 0A000
 * hot standby) adds to its message, as its hint (in place of the
 * server's) and in pq_error_text: the DSN reached a standby, or a server
 * since demoted. */
#define PQ_STANDBY_HINT                                                                           \
    "the server is a read-only standby: list every server of the cluster in the DSN "             \
    "(host=a,b,c) and set target_session_attrs=read-write, so libpq connects to the primary"

/* The first line of src (NULL reads as "") into dst, always terminated. */
void pq_first_line(char *dst, size_t len, const char *src);
/* Reads the error of a failed result r (NULL: none came back) on c. */
void pq_error_read(pq_error *e, PGconn *c, const PGresult *r);
/* The same as one line: "40001 could not serialize ..." or "database
 * connection lost: server closed the connection unexpectedly"; a
 * standby's refusal ends in " hint: " PQ_STANDBY_HINT. */
void pq_error_text(PGconn *c, const PGresult *r, char *buf, size_t len);

#endif
