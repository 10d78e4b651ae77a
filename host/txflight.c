/* txflight.c -- a transaction's statements on the wire (see txflight.h).
 *
 * A round trip on a Unix socket costs little in latency but a wake-up of
 * the server's backend and of our thread each, a large part of the host's
 * CPU per item. So a transaction's statements travel in as few flights as
 * its logic allows (tx.c decides which): libpq's pipeline mode (libpq >=
 * 14) sends several before it reads an answer, and the server runs them
 * in order, skipping everything after an error until the flight's Sync. */
#include "txflight.h"

#include <stdio.h>
#include <string.h>

#include "pqerr.h"

/* Reads one statement's answer in pipeline mode: its result, then the NULL
 * that ends it. */
static PGresult *pipeline_result(PGconn *c) {
    PGresult *r = PQgetResult(c), *extra;
    if (r && PQresultStatus(r) != PGRES_PIPELINE_SYNC)
        while ((extra = PQgetResult(c))) PQclear(extra);
    return r;
}

static int send_step(PGconn *c, const step *s) {
    return s->name ? PQsendQueryPrepared(c, s->name, s->n, s->params, s->lengths, s->formats, 0)
                   : PQsendQueryParams(c, s->sql, s->n, NULL, s->params, s->lengths, s->formats, 0);
}

static PGresult *exec_step(PGconn *c, const step *s) {
    return s->name ? PQexecPrepared(c, s->name, s->n, s->params, s->lengths, s->formats, 0)
                   : PQexecParams(c, s->sql, s->n, NULL, s->params, s->lengths, s->formats, 0);
}

int flight_ok(const PGresult *r) {
    ExecStatusType st = PQresultStatus(r);
    return r && (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK);
}

void flight_fly(PGconn *c, step *s, int n) {
    for (int i = 0; i < n; i++) s[i].r = NULL;
    if (n > 1 && PQenterPipelineMode(c)) {
        int sent = 0;
        while (sent < n && send_step(c, &s[sent])) sent++;
        if (sent == n && PQpipelineSync(c)) {
            for (int i = 0; i < n; i++)
                if (!(s[i].r = pipeline_result(c))) break;
            PGresult *sync;
            while ((sync = PQgetResult(c)) && PQresultStatus(sync) != PGRES_PIPELINE_SYNC) PQclear(sync);
            PQclear(sync);
        }
        PQexitPipelineMode(c); /* fails only on a broken connection, which the answers show */
        return;
    }
    for (int i = 0; i < n; i++)
        if (!flight_ok(s[i].r = exec_step(c, &s[i]))) break;
}

void flight_clear(step *s, int n) {
    for (int i = 0; i < n; i++) {
        PQclear(s[i].r);
        s[i].r = NULL;
    }
}

void flight_error(tx_error *e, PGconn *conn, const PGresult *res) {
    pq_error pe;
    pq_error_read(&pe, conn, res);
    memset(e, 0, sizeof *e);
    e->kind = pe.connection_lost ? TXE_CONNECTION : TXE_SQL;
    memcpy(e->sqlstate, pe.sqlstate, sizeof e->sqlstate);
    memcpy(e->message, pe.message, sizeof e->message);
    memcpy(e->detail, pe.detail, sizeof e->detail);
    memcpy(e->hint, pe.hint, sizeof e->hint);
}

/* ---- binary parameters ---------------------------------------------------
 *
 * Binary parameters (format 1) carry what text cannot: a NUL byte. Only
 * bytea reads binary as the bytes themselves; text refuses a NUL and an
 * integer would read four bytes as a number. So when there is one, the
 * statement is described first and a binary parameter of any other type
 * is refused, naming it. */

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

int flight_has_binary(int n, const int *formats) {
    int binary = 0;
    for (int i = 0; formats && i < n; i++) binary |= formats[i];
    return binary;
}

int flight_check_binary(PGconn *c, const char *sql, int n, const int *formats, tx_error *e) {
    if (!flight_has_binary(n, formats)) return 0;
    PGresult *r = PQprepare(c, "", sql, n, NULL);
    if (PQresultStatus(r) == PGRES_COMMAND_OK) {
        PQclear(r);
        r = PQdescribePrepared(c, "");
    }
    if (PQresultStatus(r) != PGRES_COMMAND_OK) {
        flight_error(e, c, r);
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
