/* connroom.c -- the server's room for this host's connections (connroom.h).
 *
 * The refusals' state is a few fields under one lock, taken alone (only
 * log.c's under it). */
#include "connroom.h"
#include "lifecycle.h"
#include "log.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* One row: the settings (NULL where the server has no such setting: the
 * two-argument current_setting answers NULL rather than failing) and the
 * client connections open now. */
static const char ROOM_SQL[] =
    "SELECT current_setting('max_connections', true), "
    "current_setting('superuser_reserved_connections', true), "
    "current_setting('reserved_connections', true), "
    "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')";

static long field(const PGresult *r, int col, int *ok) {
    if (PQgetisnull(r, 0, col)) {
        *ok = 0;
        return 0;
    }
    char *end;
    long v = strtol(PQgetvalue(r, 0, col), &end, 10);
    if (*end) *ok = 0;
    return v;
}

int connroom_check(PGconn *c, int slots, int pool_size, int pool_open) {
    PGresult *r = PQexec(c, ROOM_SQL);
    if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1) {
        PQclear(r); /* no such view or column: not PostgreSQL's accounting */
        return 0;
    }
    int ok = 1, ok_reserved = 1;
    long max = field(r, 0, &ok), su = field(r, 1, &ok), in_use = field(r, 3, &ok);
    long reserved = field(r, 2, &ok_reserved); /* PostgreSQL 16 and later */
    PQclear(r);
    if (!ok || max <= 0) return 0;
    if (ok_reserved) su += reserved;
    /* The host's own open connections are in in_use and in its pool. */
    long others = in_use - pool_open;
    if (others < 0) others = 0;
    long left = max - su - others - pool_size;
    if (left >= CONNROOM_SPARE) return 0;
    char s[24], p[24], m[24], u[24], rs[24], l[24];
    snprintf(s, sizeof s, "%d", slots);
    snprintf(p, sizeof p, "%d", pool_size);
    snprintf(m, sizeof m, "%ld", max);
    snprintf(u, sizeof u, "%ld", in_use);
    snprintf(rs, sizeof rs, "%ld", su);
    snprintf(l, sizeof l, "%ld", left);
    log_kv(LOG_WARN, "the server may run out of connections: this host's pool would leave too few for an operator",
           "slots", s, "pool", p, "max_connections", m, "in_use", u, "reserved", rs, "left", l,
           "hint", "run fewer slots, raise the server's max_connections, or keep connections for operators "
                   "(superuser_reserved_connections, or reserved_connections and a role granted "
                   "pg_use_reserved_connections)",
           NULL);
    return 1;
}

/* What PostgreSQL says when it has no room (all SQLSTATE 53300); a
 * refused connection carries no SQLSTATE in libpq, only its text. */
static int no_room(const char *why) {
    static const char *const says[] = {"too many clients already", "remaining connection slots are reserved",
                                       "too many connections for"};
    for (size_t i = 0; i < sizeof says / sizeof *says; i++)
        if (strstr(why, says[i])) return 1;
    return 0;
}

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int said;          /* under mu, like the fields below */
static double last_line;
static long unlogged;     /* refusals since the last line */

void connroom_refused(const char *why) {
    if (!no_room(why)) return;
    double now = mono_now();
    pthread_mutex_lock(&mu);
    unlogged++;
    if (!said || now - last_line >= CONNROOM_REPEAT_S) {
        char n[32];
        snprintf(n, sizeof n, "%ld", unlogged);
        log_kv(LOG_WARN, said ? "the server still refuses connections: it has no room left (SQLSTATE 53300)"
                              : "the server refused a connection: it has no room left (SQLSTATE 53300); the host "
                                "retries, and an operator's status or cancel may not connect either",
               "refused", n, "error", why,
               "hint", "run fewer slots or hosts, or raise the server's max_connections", NULL);
        said = 1;
        last_line = now;
        unlogged = 0;
    }
    pthread_mutex_unlock(&mu);
}
