/* session.c -- the host's BMDB session and the heartbeat that keeps it.
 *
 * The heartbeat thread owns one pooled connection for its whole life, so a
 * pool drained by busy workers can never starve the session. It pokes every
 * interval/2 and keeps a LOCAL deadline:
 *
 *     local = (monotonic time the successful poke was SENT) + interval - margin
 *
 * The database sets its deadline from the poke transaction's now(), which
 * is later than the moment we sent it, so the local deadline always passes
 * first (guarantee 3). session_alive() compares against the clock itself,
 * so a session whose heartbeat is stuck in a hung poke still dies on time.
 *
 * A failed poke is retried while the local deadline is ahead (the seed gave
 * up on the first error). Once the session is lost it stays lost; the
 * heartbeat then creates a new one, and items that still hold the old one
 * see their bmdb calls raise "session expired". */
#include "session.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lifecycle.h"
#include "log.h"
#include "tx.h"

struct session {
    char id[40];
    char *component;
    int refs;          /* under mu */
    int lost;          /* under mu */
    double deadline;   /* local, monotonic; under mu */
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cur_changed = PTHREAD_COND_INITIALIZER; /* realtime clock */
static pool *the_pool;
static struct session_config cfg;
static session *cur;            /* NULL while between sessions */
static int started, stopping, paused;
static pthread_t heartbeat;
static pthread_cond_t wake_heartbeat = PTHREAD_COND_INITIALIZER;

static double margin(void) {
    /* A tenth of the interval: generous against scheduling delays, and the
     * database deadline is later still by the poke's own latency. */
    return cfg.interval_s / 10.0;
}

void session_ref(session *s) {
    pthread_mutex_lock(&mu);
    s->refs++;
    pthread_mutex_unlock(&mu);
}

void session_unref(session *s) {
    if (!s) return;
    pthread_mutex_lock(&mu);
    int last = --s->refs == 0;
    pthread_mutex_unlock(&mu);
    if (last) {
        free(s->component);
        free(s);
    }
}

const char *session_id(const session *s) { return s->id; }
const char *session_component(const session *s) { return s->component; }

int session_alive(session *s) {
    pthread_mutex_lock(&mu);
    int alive = !s->lost && mono_now() < s->deadline;
    pthread_mutex_unlock(&mu);
    return alive;
}

void session_lose(session *s, const char *why) {
    pthread_mutex_lock(&mu);
    int was_lost = s->lost;
    s->lost = 1;
    if (cur == s) {
        cur = NULL;
        s->refs--; /* the host's own reference; callers still hold theirs */
        pthread_cond_broadcast(&cur_changed);
        pthread_cond_signal(&wake_heartbeat);
    }
    pthread_mutex_unlock(&mu);
    if (!was_lost) {
        log_kv(LOG_WARN, "session lost", "session", s->id, "reason", why, NULL);
        lifecycle_kick(); /* bmdb.sleep and idle slots must notice */
    }
}

/* One statement on the heartbeat's connection, bounded by the local
 * deadline: a hung server must not keep us believing in a dead session. */
static PGresult *exec_bounded(PGconn *c, const char *sql, int n, const char *const *params,
                              double until) {
    if (!PQsendQueryParams(c, sql, n, NULL, params, NULL, NULL, 0)) return NULL;
    while (PQisBusy(c)) {
        double left = until - mono_now();
        if (left <= 0) return NULL;
        struct pollfd pfd = {.fd = PQsocket(c), .events = POLLIN};
        int rc = poll(&pfd, 1, (int)(left * 1000) + 1);
        if (rc < 0 && errno != EINTR) return NULL;
        if (rc > 0 && !PQconsumeInput(c)) return NULL;
    }
    PGresult *r = PQgetResult(c), *extra;
    while ((extra = PQgetResult(c))) PQclear(extra);
    return r;
}

static session *create_session(PGconn *c, char *err, size_t errlen) {
    char interval[32];
    snprintf(interval, sizeof interval, "%d", cfg.interval_s);
    const char *params[] = {cfg.component, cfg.runtime_info, interval};
    double sent = mono_now();
    PGresult *r = exec_bounded(
        c,
        "INSERT INTO sessions (component_name, runtime_info, interval_seconds, deadline) "
        "VALUES ($1, $2, $3, now() + $3::INT8 * INTERVAL '1 second') RETURNING session_id",
        3, params, sent + cfg.interval_s);
    if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1) {
        tx_error e;
        tx_error_from_result(&e, c, r);
        snprintf(err, errlen, "cannot create session: %s%s%s", e.sqlstate, *e.sqlstate ? " " : "",
                 e.message);
        PQclear(r);
        return NULL;
    }
    session *s = calloc(1, sizeof *s);
    s->component = strdup(cfg.component);
    snprintf(s->id, sizeof s->id, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    s->refs = 1; /* the host's reference, dropped when it stops being current */
    s->deadline = sent + cfg.interval_s - margin();
    return s;
}

static void set_current(session *s) {
    pthread_mutex_lock(&mu);
    cur = s;
    pthread_cond_broadcast(&cur_changed);
    pthread_mutex_unlock(&mu);
    log_kv(LOG_INFO, "session started", "session", s->id, "component", cfg.component, NULL);
}

/* Sleeps on the heartbeat's condition until `until` (monotonic) or a stop. */
static void heartbeat_sleep(double until) {
    pthread_mutex_lock(&mu);
    while (!stopping && cur && mono_now() < until) {
        struct timespec ts = time_after(CLOCK_REALTIME, until - mono_now());
        pthread_cond_timedwait(&wake_heartbeat, &mu, &ts);
    }
    pthread_mutex_unlock(&mu);
}

static PGconn *heartbeat_conn(PGconn *c) {
    if (c && PQstatus(c) == CONNECTION_OK) return c;
    if (c) pool_put(the_pool, c); /* closes it */
    char err[512];
    c = pool_get(the_pool, err, sizeof err);
    if (!c) log_kv(LOG_WARN, "heartbeat cannot connect", "error", err, NULL);
    return c;
}

static void *heartbeat_main(void *arg) {
    PGconn *c = arg;
    double next_gc = mono_now() + cfg.interval_s;
    for (;;) {
        pthread_mutex_lock(&mu);
        int stop = stopping, pause = paused;
        session *s = cur;
        if (s) s->refs++;
        pthread_mutex_unlock(&mu);
        if (stop) {
            session_unref(s);
            break;
        }

        if (!s) {
            /* Between sessions: start a new one for new work, retrying
             * once a second through a database outage. */
            char err[512];
            session *n = (c = heartbeat_conn(c)) ? create_session(c, err, sizeof err) : NULL;
            if (n) set_current(n);
            else {
                if (c) log_kv(LOG_WARN, "cannot start a new session", "error", err, NULL);
                lifecycle_wait(1.0, HOST_CANCELLING, NULL);
            }
            continue;
        }

        if (!pause && (c = heartbeat_conn(c))) {
            const char *params[] = {s->id};
            double sent = mono_now();
            pthread_mutex_lock(&mu);
            double local = s->deadline;
            pthread_mutex_unlock(&mu);
            PGresult *r = exec_bounded(
                c,
                "UPDATE sessions SET deadline = now() + interval_seconds * INTERVAL '1 second' "
                "WHERE session_id = $1 AND deadline > now() RETURNING session_id",
                1, params, local);
            if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1) {
                pthread_mutex_lock(&mu);
                if (!s->lost) s->deadline = sent + cfg.interval_s - margin();
                pthread_mutex_unlock(&mu);
            } else if (PQresultStatus(r) == PGRES_TUPLES_OK) {
                session_lose(s, "the database no longer has the session");
            } else {
                tx_error e;
                tx_error_from_result(&e, c, r);
                log_kv(LOG_WARN, "heartbeat failed, retrying", "session", s->id, "error", e.message,
                       NULL);
                if (!r) { /* timed out or broken mid-query: start clean */
                    pool_put(the_pool, c);
                    c = NULL;
                }
            }
            PQclear(r);
        }

        double now = mono_now();
        if (!session_alive(s)) {
            session_lose(s, "local deadline passed without a successful heartbeat");
        } else if (now >= next_gc && c) {
            next_gc = now + cfg.interval_s;
            sessions_collect_expired(the_pool);
        }
        /* Next poke at interval/2; after a failure, retry sooner, but never
         * sleep past the local deadline. */
        pthread_mutex_lock(&mu);
        double local = s->deadline;
        pthread_mutex_unlock(&mu);
        double until = mono_now() + cfg.interval_s / 2.0;
        if (!pause && !c) until = mono_now() + 0.25;
        if (until > local) until = local;
        heartbeat_sleep(until);
        session_unref(s);
    }
    if (c) pool_put(the_pool, c);
    return NULL;
}

int sessions_start(pool *p, const struct session_config *config, char *err, size_t errlen) {
    the_pool = p;
    cfg.component = strdup(config->component);
    cfg.runtime_info = strdup(config->runtime_info);
    cfg.interval_s = config->interval_s;
    stopping = paused = 0;

    PGconn *c = pool_get(p, err, errlen);
    if (!c) return -1;
    session *s = create_session(c, err, errlen);
    if (!s) {
        pool_put(p, c);
        return -1;
    }
    set_current(s);
    if (pthread_create(&heartbeat, NULL, heartbeat_main, c) != 0) {
        snprintf(err, errlen, "cannot start the heartbeat thread");
        pool_put(p, c);
        return -1;
    }
    started = 1;
    return 0;
}

int sessions_started(void) { return started; }

session *session_current(double timeout_s) {
    struct timespec ts = time_after(CLOCK_REALTIME, timeout_s);
    pthread_mutex_lock(&mu);
    while (!cur && !stopping && lifecycle_state() < HOST_CANCELLING)
        if (pthread_cond_timedwait(&cur_changed, &mu, &ts) != 0) break;
    session *s = cur;
    if (s) s->refs++;
    pthread_mutex_unlock(&mu);
    return s;
}

void sessions_pause_heartbeat(int pause) {
    pthread_mutex_lock(&mu);
    paused = pause;
    pthread_cond_signal(&wake_heartbeat);
    pthread_mutex_unlock(&mu);
}

/* Runs the statements in one housekeeping transaction (no fence: these
 * act on other sessions, or on our own as it ends), retrying 40001. */
static int housekeeping(pool *p, const char *const *sqls, int nsql, const char *const *params, int nparams,
                        long *rows_of_last) {
    for (int attempt = 1;; attempt++) {
        tx t;
        tx_error e;
        int ok = tx_begin(&t, p, NULL, &e) == 0;
        for (int i = 0; ok && i < nsql; i++) {
            PGresult *r = tx_exec(&t, sqls[i], nparams, params, &e);
            if (!r) ok = 0;
            else if (i == nsql - 1 && rows_of_last) *rows_of_last = atol(PQcmdTuples(r));
            PQclear(r);
        }
        if (ok && tx_commit(&t, &e) == 0) return 0;
        tx_rollback(&t);
        double delay = tx_error_retryable(&e) ? tx_retry_delay(attempt) : -1;
        if (delay < 0) {
            log_kv(LOG_WARN, "housekeeping failed", "error", e.message, "sqlstate", e.sqlstate,
                   NULL);
            return -1;
        }
        mono_sleep(delay);
    }
}

int sessions_collect_expired(pool *p) {
    /* One SERIALIZABLE transaction: two collectors racing over the same
     * dead session conflict and one retries, so history is written once. */
    static const char *const sqls[] = {
        "INSERT INTO work_history (machine_id, process, session_id, event, cause) "
        "SELECT w.machine_id, w.process, w.session_id, 'Abandoned', 'session expired' "
        "FROM work w JOIN sessions s ON s.session_id = w.session_id WHERE s.deadline <= now()",
        "DELETE FROM sessions WHERE deadline <= now()",
    };
    long n = 0;
    if (housekeeping(p, sqls, 2, NULL, 0, &n) < 0) return -1;
    if (n > 0) {
        char buf[32];
        snprintf(buf, sizeof buf, "%ld", n);
        log_kv(LOG_INFO, "collected expired sessions", "count", buf, NULL);
    }
    return (int)n;
}

void sessions_stop(void) {
    if (!started) return;
    pthread_mutex_lock(&mu);
    stopping = 1;
    pthread_cond_broadcast(&wake_heartbeat);
    pthread_cond_broadcast(&cur_changed);
    pthread_mutex_unlock(&mu);
    pthread_join(heartbeat, NULL);

    pthread_mutex_lock(&mu);
    session *s = cur;
    cur = NULL;
    pthread_mutex_unlock(&mu);
    if (s) {
        /* Work still held is cancelled, not abandoned: we know it stopped.
         * Deleting the row cascades to the work rows. */
        static const char *const sqls[] = {
            "INSERT INTO work_history (machine_id, process, session_id, event, cause) "
            "SELECT machine_id, process, session_id, 'Canceled', 'host shutdown' "
            "FROM work WHERE session_id = $1",
            "DELETE FROM sessions WHERE session_id = $1",
        };
        const char *params[] = {s->id};
        if (housekeeping(the_pool, sqls, 2, params, 1, NULL) == 0)
            log_kv(LOG_INFO, "session ended", "session", s->id, NULL);
        session_unref(s);
    }
    free((char *)cfg.component);
    free((char *)cfg.runtime_info);
    cfg.component = cfg.runtime_info = NULL;
    started = 0;
}
