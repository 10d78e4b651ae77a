/* pool.c -- the bounded libpq connection pool shared by every thread.
 *
 * Idle connections sit on a stack; `in_use + idle` never exceeds the
 * maximum, and a thread that would exceed it waits on a condition variable.
 * Connecting happens outside the lock so one slow server does not stall
 * threads that only return connections. Who owns which connection:
 * host/README.md.
 *
 * Each pool's fields are under its own lock, which is taken after any
 * other (log.c's aside): see host/README.md for the order. */
#include "pool.h"
#include "connroom.h"
#include "lifecycle.h"
#include "lockcheck.h"
#include "log.h"
#include "pqerr.h"
#include "prepared.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

struct pool {
    char *conninfo;
    int max, open;          /* open = idle + lent out (+ being connected) */
    /* What a connection carries for its whole life, idle or lent: made
     * once at connect, so lending one allocates nothing. */
    struct pconn {
        PGconn *conn;
        PGcancel *cancel;
        prepared *prep;
        const void *owner; /* while lent: whose it is (pool_lend_to), for pool_cut_owned */
        int pid;           /* its server backend's, or 0: unknown (pool_lent_pids) */
    } *idle, *lent;
    int nidle, nlent;
    pthread_mutex_t lock;
    pthread_cond_t returned; /* on CLOCK_MONOTONIC: a clock step must not stall waiters */
};

static long server_pid(PGconn **cp);
static int pids_are_servers = 1; /* PQbackendPID is the server's pid (pool_detect_pooler) */

static void close_pconn(struct pconn *pc) {
    PQfreeCancel(pc->cancel);
    prepared_free(pc->prep);
    PQfinish(pc->conn);
}

pool *pool_create(const char *conninfo, int max_conns) {
    pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->conninfo = strdup(conninfo);
    p->max = max_conns < 1 ? 1 : max_conns;
    p->idle = calloc((size_t)p->max, sizeof *p->idle);
    p->lent = calloc((size_t)p->max, sizeof *p->lent);
    if (!p->conninfo || !p->idle || !p->lent) {
        free(p->conninfo);
        free(p->idle);
        free(p->lent);
        free(p);
        return NULL;
    }
    pthread_mutex_init(&p->lock, NULL);
    mono_cond_init(&p->returned);
    return p;
}

void pool_stats(pool *p, int *in_use, int *idle) {
    pthread_mutex_lock(&p->lock);
    *in_use = p->nlent;
    *idle = p->nidle;
    pthread_mutex_unlock(&p->lock);
}

void pool_grow(pool *p, int max_conns) {
    pthread_mutex_lock(&p->lock);
    if (max_conns > p->max) {
        struct pconn *idle = realloc(p->idle, (size_t)max_conns * sizeof *idle);
        if (idle) p->idle = idle;
        struct pconn *lent = realloc(p->lent, (size_t)max_conns * sizeof *lent);
        if (lent) p->lent = lent;
        if (idle && lent) {
            p->max = max_conns;
            pthread_cond_broadcast(&p->returned);
        }
    }
    pthread_mutex_unlock(&p->lock);
}

void pool_destroy(pool *p) {
    if (!p) return;
    for (int i = 0; i < p->nidle; i++) close_pconn(&p->idle[i]);
    /* Lent connections belong to threads that never gave them back (a slot
     * that would not stop): closing them under those threads is worse than
     * leaving them to exit(). */
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->returned);
    free(p->idle);
    free(p->lent);
    free(p->conninfo);
    free(p);
}

/* "host=... port=... dbname=... user=..." of a connection, for messages. */
static void describe_conn(PGconn *conn, char *buf, size_t len) {
    const char *host = PQhost(conn), *port = PQport(conn);
    const char *db = PQdb(conn), *user = PQuser(conn);
    snprintf(buf, len, "host=%s port=%s dbname=%s user=%s", host && *host ? host : "(default)",
             port && *port ? port : "(default)", db ? db : "?", user ? user : "?");
}

/* Server notices (e.g. "already exists, skipping") are not the operator's
 * business at info level. */
static void notice_to_log(void *arg, const char *msg) {
    (void)arg;
    char line[512];
    pq_first_line(line, sizeof line, msg);
    log_kv(LOG_DEBUG, "server notice", "notice", line, NULL);
}

/* libpq's own test for "a connection string, not a database name". */
static int is_conninfo(const char *s) {
    return strncmp(s, "postgresql://", 13) == 0 || strncmp(s, "postgres://", 11) == 0 || strchr(s, '=');
}

/* A quoted fragment worth keeping in a message about a DSN: a connection
 * keyword ("dbname") or one punctuation mark ("="). Everything else libpq
 * quotes is a piece of the DSN -- a whole URI, a percent-encoded value --
 * and may be the password. */
static int fragment_is_safe(const char *s, size_t n) {
    if (n == 1) return !((*s >= '0' && *s <= '9') || (*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z'));
    int safe = 0;
    PQconninfoOption *opts = PQconndefaults();
    for (PQconninfoOption *o = opts; o && o->keyword; o++)
        if (strlen(o->keyword) == n && memcmp(o->keyword, s, n) == 0) safe = 1;
    PQconninfoFree(opts);
    return safe;
}

/* Copies libpq's message about a DSN with every unsafe "quoted fragment"
 * replaced by "...", keeping the first line only. */
static void redact_quoted(char *dst, size_t len, const char *msg) {
    size_t o = 0;
    for (const char *s = msg; *s && *s != '\n' && o + 1 < len;) {
        const char *end = *s == '"' ? strchr(s + 1, '"') : NULL;
        if (end && !fragment_is_safe(s + 1, (size_t)(end - s - 1))) {
            o += (size_t)snprintf(dst + o, len - o, "\"...\"");
            if (o >= len) o = len - 1;
            s = end + 1;
        } else if (end) {
            size_t n = (size_t)(end - s + 1);
            if (n > len - 1 - o) n = len - 1 - o;
            memcpy(dst + o, s, n);
            o += n;
            s = end + 1;
        } else {
            dst[o++] = *s++;
        }
    }
    dst[o] = '\0';
}

/* Replaces every occurrence of secret in buf (of size len) by "***". */
static void scrub(char *buf, size_t len, const char *secret) {
    size_t n = strlen(secret);
    char *out = n ? malloc(len) : NULL;
    if (!out) return;
    size_t o = 0;
    for (const char *s = buf; *s && o + 1 < len;) {
        if (strncmp(s, secret, n) == 0) {
            for (int i = 0; i < 3 && o + 1 < len; i++) out[o++] = '*';
            s += n;
        } else {
            out[o++] = *s++;
        }
    }
    out[o] = '\0';
    memcpy(buf, out, o + 1);
    free(out);
}

/* Parses conninfo the way libpq will, so a malformed DSN is reported here
 * with its pieces redacted rather than echoed by PQconnectdb. On success
 * copies the password (if any) into pw, for scrubbing later messages, and
 * says whether the DSN sets connect_timeout. */
static int check_conninfo(const char *conninfo, char *pw, size_t pwlen, int *has_timeout, char *err,
                          size_t errlen) {
    pw[0] = '\0';
    *has_timeout = 0;
    if (!is_conninfo(conninfo)) return 0; /* a bare database name */
    char *why = NULL;
    PQconninfoOption *opts = PQconninfoParse(conninfo, &why);
    if (!opts) {
        char safe[512];
        redact_quoted(safe, sizeof safe, why ? why : "out of memory");
        snprintf(err, errlen, "cannot connect to database: the DSN is not a valid libpq "
                              "connection string or URI: %s", safe);
        PQfreemem(why);
        return -1;
    }
    for (PQconninfoOption *o = opts; o->keyword; o++) {
        if (strcmp(o->keyword, "password") == 0 && o->val) snprintf(pw, pwlen, "%s", o->val);
        if (strcmp(o->keyword, "connect_timeout") == 0 && o->val && *o->val) *has_timeout = 1;
    }
    PQconninfoFree(opts);
    return 0;
}

/* libpq's message of a failed connect has a line per attempt
 * ("connection to server at ... failed: why"), each perhaps followed by
 * indented hints: every attempt, in order, on one line. Returns how many. */
static int attempts_line(char *dst, size_t len, const char *msg) {
    size_t o = 0;
    int n = 0;
    dst[0] = '\0';
    for (const char *s = msg ? msg : ""; *s;) {
        size_t l = strcspn(s, "\n");
        if (l > 0 && *s != '\t' && *s != ' ' && o + 1 < len) {
            o += (size_t)snprintf(dst + o, len - o, "%s%.*s", n ? "; " : "", (int)l, s);
            if (o >= len) o = len - 1;
            n++;
        }
        s += l;
        if (*s) s++;
    }
    return n;
}

PGconn *pool_connect(const char *conninfo, char *err, size_t errlen) {
    char pw[256];
    int has_timeout;
    if (check_conninfo(conninfo, pw, sizeof pw, &has_timeout, err, errlen) < 0) return NULL;
    /* expand_dbname lets conninfo be a keyword string or a URI. A keyword
     * after dbname would override what conninfo says, and the environment
     * only fills keywords left unset: so the host's connect_timeout is
     * passed only when neither the DSN nor PGCONNECT_TIMEOUT sets one
     * (with none, libpq waits for ever on a route that hangs). */
    const char *env_timeout = getenv("PGCONNECT_TIMEOUT");
    int default_timeout = !has_timeout && !(env_timeout && *env_timeout);
    const char *keys[] = {"fallback_application_name", "dbname", default_timeout ? "connect_timeout" : NULL, NULL};
    const char *vals[] = {"bmdb-host", conninfo, "10", NULL};
    PGconn *c = PQconnectdbParams(keys, vals, 1);
    if (!c) {
        snprintf(err, errlen, "cannot connect to database: out of memory");
        return NULL;
    }
    if (PQstatus(c) != CONNECTION_OK) {
        char where[512], why[1536];
        /* Each attempt names its server; past one, PQhost is only the last. */
        if (attempts_line(why, sizeof why, PQerrorMessage(c)) > 1) {
            const char *db = PQdb(c), *user = PQuser(c);
            snprintf(where, sizeof where, "dbname=%s user=%s", db ? db : "?", user ? user : "?");
        } else {
            describe_conn(c, where, sizeof where);
            pq_first_line(why, sizeof why, PQerrorMessage(c));
        }
        snprintf(err, errlen, "cannot connect to database (%s): %s", where, why);
        scrub(err, errlen, pw); /* whatever libpq said, never the password */
        PQfinish(c);
        connroom_refused(err); /* no room on the server: said once, not per attempt */
        return NULL;
    }
    PQsetNoticeProcessor(c, notice_to_log, NULL);
    return c;
}

/* An idle connection has nothing to say: if its socket is readable, the
 * server closed it (restart, pg_terminate_backend) or is about to. Costs a
 * poll(), no round trip. */
static int idle_conn_alive(PGconn *c) {
    if (PQstatus(c) != CONNECTION_OK) return 0;
    struct pollfd pfd = {.fd = PQsocket(c), .events = POLLIN};
    if (poll(&pfd, 1, 0) <= 0) return 1;
    return PQconsumeInput(c) && PQstatus(c) == CONNECTION_OK;
}

/* Under p->lock; the lent entry of c, or NULL. */
static struct pconn *lent_entry(pool *p, PGconn *c) {
    LOCK_HELD(&p->lock);
    for (int i = 0; i < p->nlent; i++)
        if (p->lent[i].conn == c) return &p->lent[i];
    return NULL;
}

prepared *pool_lend_to(pool *p, PGconn *c, const void *owner) {
    pthread_mutex_lock(&p->lock);
    struct pconn *pc = lent_entry(p, c);
    prepared *prep = NULL;
    if (pc) {
        pc->owner = owner;
        prep = pc->prep;
    }
    pthread_mutex_unlock(&p->lock);
    return prep;
}

PGconn *pool_get(pool *p, double wait_s, char *err, size_t errlen) {
    struct timespec until = time_after(CLOCK_MONOTONIC, wait_s);
    pthread_mutex_lock(&p->lock);
    for (;;) {
        while (p->nidle > 0) {
            struct pconn pc = p->idle[--p->nidle];
            if (idle_conn_alive(pc.conn)) {
                p->lent[p->nlent++] = pc;
                pthread_mutex_unlock(&p->lock);
                return pc.conn;
            }
            close_pconn(&pc); /* dead while idle: a fresh one replaces it */
            p->open--;
        }
        if (p->open < p->max) break;
        if (pthread_cond_timedwait(&p->returned, &p->lock, &until) == ETIMEDOUT) {
            int max = p->max;
            pthread_mutex_unlock(&p->lock);
            snprintf(err, errlen, "no database connection came free within %.0f s (all %d in use)",
                     wait_s, max);
            return NULL;
        }
    }
    p->open++; /* reserve the slot, then connect without the lock */
    pthread_mutex_unlock(&p->lock);

    struct pconn pc = {.conn = pool_connect(p->conninfo, err, errlen)};
    if (pc.conn) {
        pc.cancel = PQgetCancel(pc.conn);
        /* Behind a transaction pooler a name prepared here would be found
         * on whichever backend the next client gets: no cache, and every
         * statement goes unnamed (Parse, Bind and Execute in one message
         * group, which the pooler keeps on one backend). */
        pc.prep = pool_transaction_pooled() ? NULL : prepared_new();
        /* Behind a session pooler the backend is this connection's for its
         * life, but only the server can name it: one round trip, once. */
        pc.pid = pids_are_servers ? PQbackendPID(pc.conn) : pool_transaction_pooled() ? 0 : (int)server_pid(&pc.conn);
        if (!pc.conn) {
            PQfreeCancel(pc.cancel);
            prepared_free(pc.prep);
            snprintf(err, errlen, "cannot connect to database: the new connection broke at its first statement");
        }
    }
    pthread_mutex_lock(&p->lock);
    if (pc.conn) p->lent[p->nlent++] = pc;
    else {
        p->open--;
        pthread_cond_signal(&p->returned);
    }
    pthread_mutex_unlock(&p->lock);
    return pc.conn;
}

void pool_put(pool *p, PGconn *conn) {
    if (!conn) return;
    /* Only a clean, idle connection goes back: anything else could leak a
     * transaction (and its fence) into the next borrower. One whose cancel
     * request was spent (pool_cancel_lent) is closed too. */
    int reusable = PQstatus(conn) == CONNECTION_OK && PQtransactionStatus(conn) == PQTRANS_IDLE;
    struct pconn pc = {.conn = conn};
    pthread_mutex_lock(&p->lock);
    struct pconn *e = lent_entry(p, conn);
    if (e) {
        pc = *e;
        *e = p->lent[--p->nlent];
    }
    pc.owner = NULL;
    if (reusable && pc.cancel) p->idle[p->nidle++] = pc;
    else {
        reusable = 0;
        p->open--;
    }
    pthread_cond_signal(&p->returned);
    pthread_mutex_unlock(&p->lock);
    if (!reusable) close_pconn(&pc);
}

PGconn *pool_connect_own(pool *p, char *err, size_t errlen) {
    return pool_connect(p->conninfo, err, errlen);
}

/* Cancel requests go out from threads of their own. PQcancel opens a
 * connection to the server and waits until the server closes it, with no
 * bound at all (libpq 15 has no cancel that does not block; 17's
 * PQcancelStart has): on a route that hangs (a frozen proxy, a
 * black-holed address) it would hang the thread that asked, and that is
 * the heartbeat, which must give its session up on its own clock, or
 * shutdown, which must end. So whoever asks for a cancel never waits for
 * it. At most CANCELS_MAX are in flight at once; past that a request is
 * dropped, since those in flight hang on the same route (the connection
 * it was for is closed or abandoned all the same). */
#define CANCELS_MAX 8
static pthread_mutex_t cancels_mu = PTHREAD_MUTEX_INITIALIZER;
static int cancels_in_flight; /* under cancels_mu */

static void *cancel_main(void *arg) {
    char buf[256];
    PQcancel(arg, buf, sizeof buf);
    PQfreeCancel(arg);
    pthread_mutex_lock(&cancels_mu);
    cancels_in_flight--;
    pthread_mutex_unlock(&cancels_mu);
    return NULL;
}

/* Sends the cancel request `cancel` from a detached thread, which frees
 * it; frees it unsent when CANCELS_MAX are in flight. */
static void cancel_detached(PGcancel *cancel) {
    if (!cancel) return;
    pthread_mutex_lock(&cancels_mu);
    int room = cancels_in_flight < CANCELS_MAX;
    if (room) cancels_in_flight++;
    pthread_mutex_unlock(&cancels_mu);
    pthread_attr_t attr;
    pthread_t th;
    int started = 0;
    if (room && pthread_attr_init(&attr) == 0) {
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        started = pthread_create(&th, &attr, cancel_main, cancel) == 0;
        pthread_attr_destroy(&attr);
    }
    if (started) return;
    if (room) {
        pthread_mutex_lock(&cancels_mu);
        cancels_in_flight--;
        pthread_mutex_unlock(&cancels_mu);
    }
    log_kv(LOG_DEBUG, room ? "cancel request not sent: no thread for it"
                           : "cancel request not sent: too many in flight", NULL);
    PQfreeCancel(cancel);
}

void pool_cancel_lent(pool *p) {
    pthread_mutex_lock(&p->lock);
    /* Each request's PGcancel goes to its thread, which frees it: the
     * connection keeps none, and is closed when it comes back (pool_put),
     * rather than lent again without a way to cancel it. */
    for (int i = 0; i < p->nlent; i++) {
        cancel_detached(p->lent[i].cancel);
        p->lent[i].cancel = NULL;
    }
    pthread_mutex_unlock(&p->lock);
}

/* shutdown(2), not close: the descriptor stays its borrower's (no other
 * file can take its number), and whatever libpq waits on in that thread
 * returns at once, end of file or a broken pipe, as from a network that
 * failed. Nothing of a lost session can commit, so nothing is lost by it;
 * and on a route that hangs, nothing else would ever wake that thread. */
void pool_cut_owned(pool *p, const void *owner) {
    if (!owner) return;
    pthread_mutex_lock(&p->lock);
    for (int i = 0; i < p->nlent; i++)
        if (p->lent[i].owner == owner && PQsocket(p->lent[i].conn) >= 0)
            shutdown(PQsocket(p->lent[i].conn), SHUT_RDWR);
    pthread_mutex_unlock(&p->lock);
}

/* Set before any thread starts (pool.h), read-only after. */
static pool_pooler pooler_mode = POOLER_REFUSE;

void pool_set_pooler(pool_pooler mode) {
    pooler_mode = mode;
    if (mode == POOLER_TRANSACTION) pids_are_servers = 0;
}

int pool_transaction_pooled(void) { return pooler_mode == POOLER_TRANSACTION; }

#define PROBE_WAIT_S 10.0

/* pg_backend_pid() as the server behind *cp reports it; 0 when it gave
 * none (no such function, an error: then *cp may be closed). */
static long server_pid(PGconn **cp) {
    char why[256];
    if (!*cp) return 0;
    PGresult *r = pool_exec_bounded(cp, "SELECT pg_backend_pid()", 0, NULL, mono_now() + PROBE_WAIT_S, why,
                                    sizeof why);
    long pid = PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 ? atol(PQgetvalue(r, 0, 0)) : 0;
    PQclear(r);
    return pid;
}

/* One statement of the probe; 0, or -1 with the server's (or the
 * pooler's) first line of error in why. */
static int probe_exec(PGconn **cp, const char *sql, char *why, size_t len) {
    why[0] = '\0';
    if (!*cp) return -1;
    PGresult *r = pool_exec_bounded(cp, sql, 0, NULL, mono_now() + PROBE_WAIT_S, why, len);
    int ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    if (r && !ok) pq_first_line(why, len, PQresultErrorMessage(r));
    PQclear(r);
    return ok ? 0 : -1;
}

/* The second half of pool_detect_pooler: a opens no transaction, b does,
 * a few rounds (another client of the pooler may take the backend a
 * left, so one round may see nothing). */
static int probe_sharing(PGconn **a, PGconn **b, char *seen, size_t len) {
    char why[256];
    for (int round = 0; round < 3; round++) {
        long x = server_pid(a);
        if (probe_exec(b, "BEGIN", why, sizeof why) < 0) {
            if (!strstr(why, "pooling mode")) return 0; /* nothing tells */
            snprintf(seen, len, "the pooler refused a transaction block (%s): a pooler in statement mode "
                                "(pgbouncer pool_mode=statement?)", why);
            return 1;
        }
        long y = server_pid(b); /* b's backend: b holds it while its transaction is open */
        long z = server_pid(a);
        probe_exec(b, "COMMIT", why, sizeof why);
        if (x > 0 && y == x) {
            snprintf(seen, len, "a second connection was served by the first one's backend (pid %ld): a pooler "
                                "in transaction or statement mode (pgbouncer pool_mode=transaction?)", x);
            return 1;
        }
        if (x > 0 && z > 0 && z != x) {
            snprintf(seen, len, "the server's backend pid changed between transactions on one connection (%ld, "
                                "then %ld): a pooler in transaction or statement mode (pgbouncer "
                                "pool_mode=transaction?)", x, z);
            return 1;
        }
    }
    return 0;
}

int pool_detect_pooler(pool *p, char *seen, size_t seenlen) {
    seen[0] = '\0';
    if (pooler_mode == POOLER_TRANSACTION) return 0;
    PGconn *a = pool_connect(p->conninfo, seen, seenlen), *b = NULL;
    if (!a) return -1;
    int found = 0, libpq_pid = PQbackendPID(a);
    long pid = server_pid(&a);
    if (pid > 0 && pid != libpq_pid) {
        /* A pooler or proxy answers for the server: its pid is no backend's
         * (pgbouncer makes one up), so each connection asks the server. */
        pids_are_servers = 0;
        /* Connections made before (bootstrap's first) took libpq's pid:
         * they go, and their successors ask the server. */
        pthread_mutex_lock(&p->lock);
        while (p->nidle > 0) {
            close_pconn(&p->idle[--p->nidle]);
            p->open--;
        }
        pthread_mutex_unlock(&p->lock);
        char err[512];
        if (pooler_mode != POOLER_SESSION && (b = pool_connect(p->conninfo, err, sizeof err)))
            found = probe_sharing(&a, &b, seen, seenlen);
    }
    if (a) PQfinish(a);
    if (b) PQfinish(b);
    return found;
}

int pool_lent_pids(pool *p, int *pids, int max) {
    int n = 0;
    pthread_mutex_lock(&p->lock);
    for (int i = 0; i < p->nlent && n < max; i++) {
        int pid = p->lent[i].pid; /* learnt at connect */
        if (pid > 0) pids[n++] = pid;
    }
    pthread_mutex_unlock(&p->lock);
    return n;
}

/* A statement that got no answer in time leaves its connection mid-query,
 * and every later send on it would fail ("another command is already in
 * progress"), so the connection is given up: the server is asked to cancel
 * the statement (a backend left waiting on a lock would hold its own
 * locks) and the connection is closed. */
PGresult *pool_exec_bounded(PGconn **cp, const char *sql, int n, const char *const *params,
                            double until, char *why, size_t whylen) {
    PGconn *c = *cp;
    int sent = PQsendQueryParams(c, sql, n, NULL, params, NULL, NULL, 0);
    int timed_out = 0;
    while (sent && PQisBusy(c)) {
        double left = until - mono_now();
        if (left <= 0) {
            timed_out = 1;
            break;
        }
        struct pollfd pfd = {.fd = PQsocket(c), .events = POLLIN};
        int rc = poll(&pfd, 1, (int)(left * 1000) + 1);
        if (rc < 0 && errno != EINTR) break;
        if (rc > 0 && !PQconsumeInput(c)) break;
    }
    if (sent && !timed_out && !PQisBusy(c)) {
        PGresult *r = PQgetResult(c), *extra;
        while ((extra = PQgetResult(c))) PQclear(extra);
        if (r && PQstatus(c) == CONNECTION_OK) return r;
        if (r && PQresultErrorField(r, PG_DIAG_SQLSTATE)) return r; /* e.g. 57P01, then closed below */
        PQclear(r);
    }
    if (timed_out) {
        snprintf(why, whylen, "no answer from the database in time");
        cancel_detached(PQgetCancel(c)); /* not waited for: the route may hang too */
    } else {
        pq_error_text(c, NULL, why, whylen);
    }
    PQfinish(c);
    *cp = NULL;
    return NULL;
}

void pool_result_failed(PGconn **cp, const PGresult *r, char *why, size_t whylen) {
    pq_error e;
    pq_error_read(&e, *cp, r);
    pq_error_text(*cp, r, why, whylen);
    /* A standby's refusal holds for as long as the connection does: the
     * next one may reach the primary (target_session_attrs=read-write). */
    if (PQstatus(*cp) != CONNECTION_OK || e.standby) {
        PQfinish(*cp);
        *cp = NULL;
    }
}

/* No fence: the heartbeat's housekeeping acts on other sessions, or on our
 * own as it ends or as it looks for its strays. */
int pool_exec_transaction_bounded(PGconn **cp, const char *const *sqls, int nsql, const char *const *params,
                                  int nparams, double until, long *rows_of_last, char *why, size_t whylen) {
    PGresult *r = pool_exec_bounded(cp, "BEGIN ISOLATION LEVEL SERIALIZABLE", 0, NULL, until, why, whylen);
    int ok = r && PQresultStatus(r) == PGRES_COMMAND_OK;
    if (r && !ok) pool_result_failed(cp, r, why, whylen);
    PQclear(r);
    for (int i = 0; ok && i <= nsql; i++) {
        const char *sql = i < nsql ? sqls[i] : "COMMIT";
        r = pool_exec_bounded(cp, sql, i < nsql ? nparams : 0, params, until, why, whylen);
        ExecStatusType st = PQresultStatus(r);
        ok = r && (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK);
        if (r && !ok) pool_result_failed(cp, r, why, whylen);
        else if (ok && i == nsql - 1 && rows_of_last) *rows_of_last = atol(PQcmdTuples(r));
        PQclear(r);
    }
    if (!ok && *cp && PQtransactionStatus(*cp) != PQTRANS_IDLE) PQclear(PQexec(*cp, "ROLLBACK"));
    return ok ? 0 : -1;
}
