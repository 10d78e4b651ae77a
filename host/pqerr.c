/* pqerr.c -- what libpq says went wrong, as one line of text.
 *
 * The one place that reads PQresultErrorField and PQerrorMessage (see
 * pqerr.h): a server error keeps its SQLSTATE and fields, anything else is
 * a lost connection, worded the same everywhere. */
#include "pqerr.h"

#include <stdio.h>
#include <string.h>

void pq_first_line(char *dst, size_t len, const char *src) {
    if (len == 0) return;
    if (!src) src = "";
    size_t n = strcspn(src, "\n");
    if (n >= len) n = len - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

/* The server is a standby (or was demoted) and refuses what the host
 * needs of a primary: 25006 on a server that reports itself read-only
 * (in_hot_standby, default_transaction_read_only: PostgreSQL 14 and
 * later; an older one that reports neither is taken at its word), or
 * 0A000 about hot standby ("cannot use serializable mode in a hot
 * standby"). A body's own READ ONLY transaction that writes gets 25006 on
 * a primary too, and no hint. */
static int standby_refusal(PGconn *c, const pq_error *e) {
    if (strcmp(e->sqlstate, "0A000") == 0) return strstr(e->message, "hot standby") != NULL;
    if (strcmp(e->sqlstate, "25006") != 0) return 0;
    const char *hs = PQparameterStatus(c, "in_hot_standby");
    const char *ro = PQparameterStatus(c, "default_transaction_read_only");
    if (!hs && !ro) return 1;
    return (hs && strcmp(hs, "on") == 0) || (ro && strcmp(ro, "on") == 0);
}

void pq_error_read(pq_error *e, PGconn *c, const PGresult *r) {
    memset(e, 0, sizeof *e);
    const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    /* A server error on a connection that then broke (57P01, the backend
     * was terminated) is a lost connection: what matters to the caller is
     * that nothing more runs on it. */
    if (state && PQstatus(c) == CONNECTION_OK) {
        snprintf(e->sqlstate, sizeof e->sqlstate, "%s", state);
        pq_first_line(e->message, sizeof e->message, PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY));
        pq_first_line(e->detail, sizeof e->detail, PQresultErrorField(r, PG_DIAG_MESSAGE_DETAIL));
        pq_first_line(e->hint, sizeof e->hint, PQresultErrorField(r, PG_DIAG_MESSAGE_HINT));
        /* In place of the server's own hint: "You can use REPEATABLE READ
         * instead" is no advice for a host whose fences are SERIALIZABLE. */
        if (standby_refusal(c, e)) {
            e->standby = 1;
            snprintf(e->hint, sizeof e->hint, "%s", PQ_STANDBY_HINT);
        }
        return;
    }
    e->connection_lost = 1;
    size_t n = (size_t)snprintf(e->message, sizeof e->message, "database connection lost: ");
    pq_first_line(e->message + n, sizeof e->message - n, PQerrorMessage(c));
}

void pq_error_text(PGconn *c, const PGresult *r, char *buf, size_t len) {
    pq_error e;
    pq_error_read(&e, c, r);
    snprintf(buf, len, "%s%s%s%s%s", e.sqlstate, *e.sqlstate ? " " : "", e.message,
             e.standby ? " hint: " : "", e.standby ? e.hint : "");
}
