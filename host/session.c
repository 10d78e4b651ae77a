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
 * so a session whose heartbeat is stuck in a hung poke still dies on time,
 * and the main loop calls sessions_check_deadline() to declare it lost
 * (log, metric, wake-ups) on time too: the heartbeat thread may be in a
 * connect that takes longer than the interval.
 *
 * A failed poke is retried while the local deadline is ahead (the seed gave
 * up on the first error). Once the session is lost it stays lost; the
 * heartbeat then creates a new one, and items that still hold the old one
 * see their bmdb calls raise "session expired". What becomes of a session's
 * work when it ends is the work module's SQL (work_housekeeping), handed
 * over in session_config. Threads, connections and lock order:
 * host/README.md. */
#include "session.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lifecycle.h"
#include "log.h"
#include "metrics.h"
#include "notify.h"
#include "outage.h"
#include "pqerr.h"

struct session {
    char id[40];
    char *component;
    int refs;          /* under mu */
    int lost;          /* under mu */
    double deadline;   /* local, monotonic; under mu */
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cur_changed, wake_heartbeat; /* CLOCK_MONOTONIC, see cond_init */
static session *cur;            /* under mu; NULL while between sessions */
static int stopping, paused;    /* under mu */
static int round_now;           /* under mu: sessions_wake_heartbeat asked */
/* Set by sessions_start before the heartbeat thread exists and cleared by
 * sessions_stop after it was joined: read without a lock in between. */
static pool *the_pool;
static struct session_config cfg;
static int started;             /* the caller's thread only (main, or Lua's) */
static pthread_t heartbeat;
static pthread_once_t conds_once = PTHREAD_ONCE_INIT;

/* Timed waits measure on the monotonic clock: stepping the wall clock
 * back must not stall the heartbeat. */
static void cond_init(void) {
    mono_cond_init(&cur_changed);
    mono_cond_init(&wake_heartbeat);
}

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

double session_local_deadline(session *s) {
    pthread_mutex_lock(&mu);
    double d = s->deadline;
    pthread_mutex_unlock(&mu);
    return d;
}

int session_lose(session *s, const char *why) {
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
        metrics_session_lost();
        notify_status("session lost: %s", why);
        lifecycle_kick(); /* bmdb.sleep and idle slots must notice */
    }
    return !was_lost;
}

/* s's local deadline passed: the database could not be reached in time,
 * perhaps because the route to it hangs. Statements of s's transactions
 * still waiting on it could then wait for ever, and nothing of s can
 * commit any more: their connections are cut (pool.h). When the database
 * itself said the session is gone, the route works and nothing is cut:
 * a COMMIT already in flight then still gets its answer. */
static void lose_locally(session *s) {
    if (session_lose(s, "local deadline passed without a successful heartbeat")) pool_cut_owned(the_pool, s);
}

void sessions_check_deadline(void) {
    pthread_mutex_lock(&mu);
    session *s = cur;
    int passed = s && !s->lost && mono_now() >= s->deadline;
    if (passed) s->refs++;
    pthread_mutex_unlock(&mu);
    if (!passed) return;
    lose_locally(s);
    session_unref(s);
}

/* Every statement of the heartbeat goes through pool_exec_bounded: a hung
 * server must not keep us believing in a dead session. */

static session *create_session(PGconn **cp, char *err, size_t errlen) {
    char interval[32], why[1024];
    snprintf(interval, sizeof interval, "%d", cfg.interval_s);
    const char *params[] = {cfg.component, cfg.runtime_info, interval};
    double sent = mono_now();
    PGresult *r = pool_exec_bounded(
        cp,
        "INSERT INTO sessions (component_name, runtime_info, interval_seconds, deadline) "
        "VALUES ($1, $2, $3, now() + $3::INT8 * INTERVAL '1 second') RETURNING session_id",
        3, params, sent + cfg.interval_s, why, sizeof why);
    if (r && (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1)) {
        pool_result_failed(cp, r, why, sizeof why);
        PQclear(r);
        r = NULL;
    }
    if (!r) {
        snprintf(err, errlen, "cannot create session: %s", why);
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
    metrics_session_started();
    notify_status("session %s live", s->id);
}

/* Sleeps on the heartbeat's condition until `until` (monotonic) or a stop. */
static void heartbeat_sleep(double until) {
    pthread_mutex_lock(&mu);
    while (!stopping && cur && !round_now && mono_now() < until) {
        struct timespec ts = time_after(CLOCK_MONOTONIC, until - mono_now());
        pthread_cond_timedwait(&wake_heartbeat, &mu, &ts);
    }
    round_now = 0;
    pthread_mutex_unlock(&mu);
}

/* The heartbeat's connection is its own, not the pool's: slots that hold
 * every pooled connection must never stall the session. */
static PGconn *heartbeat_conn(PGconn *c) {
    if (c && PQstatus(c) == CONNECTION_OK) return c;
    if (c) PQfinish(c);
    char err[1024];
    c = pool_connect_own(the_pool, err, sizeof err);
    if (!c) outage_failed("heartbeat", err);
    return c;
}

/* Pushes s's deadline forward. 1 done, 0 failed (retry while the local
 * deadline is ahead), -1 the database no longer has the session. */
static int poke(PGconn **cp, session *s) {
    const char *params[] = {s->id};
    char why[600];
    double sent = mono_now();
    pthread_mutex_lock(&mu);
    double until = s->deadline;
    pthread_mutex_unlock(&mu);
    /* One attempt may not take all the time left: a connection that hangs
     * (a frozen backend, a black-holed route) must leave room for another
     * attempt on a fresh connection before the local deadline. */
    if (until > sent + cfg.interval_s / 4.0) until = sent + cfg.interval_s / 4.0;
    PGresult *r = pool_exec_bounded(
        cp,
        "UPDATE sessions SET deadline = now() + interval_seconds * INTERVAL '1 second' "
        "WHERE session_id = $1 AND deadline > now() RETURNING session_id",
        1, params, until, why, sizeof why);
    int outcome = 0;
    if (r && PQresultStatus(r) == PGRES_TUPLES_OK) {
        outcome = PQntuples(r) == 1 ? 1 : -1;
        if (outcome == 1) {
            pthread_mutex_lock(&mu);
            if (!s->lost) s->deadline = sent + cfg.interval_s - margin();
            pthread_mutex_unlock(&mu);
            notify_watchdog(); /* a wedged heartbeat stops these: systemd restarts us */
            outage_ended();
        }
    } else if (r) {
        pool_result_failed(cp, r, why, sizeof why);
    }
    PQclear(r);
    metrics_heartbeat(outcome == 1, mono_now() - sent);
    if (outcome == 0) outage_failed("heartbeat", why); /* retried: outage.h says how often it is logged */
    return outcome;
}

/* Collects sessions past their deadline with cfg.housekeeping->collect
 * (work.c: their work rows are recorded Abandoned and deleted with them).
 * Runs on the heartbeat's connection within `until`. Two collectors racing over the same dead session
 * conflict (SERIALIZABLE) and one fails, so history is written once; a
 * failure is simply tried again next round. The DELETE waits for any
 * transaction of the dead session still in flight (each holds a KEY SHARE
 * lock on its session row, or an item's on its work row, to which the
 * DELETE cascades: tx.c), so a zombie's late commit is ordered before the
 * collection, never after it. */
static void collect_expired(PGconn **cp, double until) {
    const struct session_housekeeping *hk = cfg.housekeeping;
    char why[600];
    long n = 0;
    const char *const *sql = hk->collect_plain && !hk->plain_off() ? hk->collect_plain : hk->collect;
    if (pool_exec_transaction_bounded(cp, sql, hk->ncollect, NULL, 0, until, &n, why, sizeof why) < 0) {
        if (hk->collect_plain) hk->plain_if(why); /* the next round runs without it */
        log_kv(LOG_DEBUG, "collecting expired sessions failed; the next round retries", "error", why,
               NULL);
    } else if (n > 0) {
        char buf[32];
        snprintf(buf, sizeof buf, "%ld", n);
        log_kv(LOG_INFO, "collected expired sessions", "count", buf, NULL);
    }
}

#define RETRY_S 0.2 /* between heartbeat attempts after a failure */

/* Between sessions: start a new one for new work, retrying (the caller
 * loops) through a database outage. */
static void start_next_session(PGconn **cp) {
    char err[1100] = "";
    session *n = (*cp = heartbeat_conn(*cp)) ? create_session(cp, err, sizeof err) : NULL;
    if (n) {
        outage_ended();
        set_current(n);
        return;
    }
    if (*err) outage_failed("new session", err); /* (a failed connect was counted already) */
    lifecycle_wait(1.0, HOST_CANCELLING, NULL);
}

/* One round for the live session s: poke it (unless paused), give it up
 * once its local deadline passed, collect expired sessions every interval.
 * Returns the outcome of the poke (1 done, 0 failed, -1 gone; 1 when
 * paused). */
static int keep_session(PGconn **cp, session *s, int pause, double *next_gc) {
    int ok = 1;
    if (!pause) {
        ok = (*cp = heartbeat_conn(*cp)) ? poke(cp, s) : 0;
        if (ok < 0) session_lose(s, "the database no longer has the session");
    }
    double now = mono_now();
    if (!session_alive(s)) {
        lose_locally(s);
    } else if (ok > 0 && !pause) {
        if (cfg.housekeeping->soon && *cp) cfg.housekeeping->soon(cp, s->id, now + cfg.interval_s / 4.0);
        if (now >= *next_gc) {
            *next_gc = now + cfg.interval_s;
            collect_expired(cp, now + cfg.interval_s / 4.0);
            if (cfg.housekeeping->sweep && *cp) cfg.housekeeping->sweep(cp, s->id, now + cfg.interval_s / 4.0);
        }
    }
    return ok;
}

/* Sleeps until the next poke: interval/2 after a good one; a failed one is
 * retried soon, while the local deadline is still ahead, so a dropped
 * connection or a quick server restart does not cost the session. */
static void wait_next_round(session *s, int ok, int pause) {
    pthread_mutex_lock(&mu);
    double local = s->deadline;
    pthread_mutex_unlock(&mu);
    double until = mono_now() + (ok || pause ? cfg.interval_s / 2.0 : RETRY_S);
    if (until > local) until = local;
    heartbeat_sleep(until);
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
            start_next_session(&c);
            continue;
        }
        int ok = keep_session(&c, s, pause, &next_gc);
        wait_next_round(s, ok, pause);
        session_unref(s);
    }
    if (c) PQfinish(c);
    return NULL;
}

int sessions_start(pool *p, const struct session_config *config, char *err, size_t errlen) {
    pthread_once(&conds_once, cond_init);
    the_pool = p;
    cfg.component = strdup(config->component);
    cfg.runtime_info = strdup(config->runtime_info);
    cfg.interval_s = config->interval_s;
    cfg.housekeeping = config->housekeeping;
    stopping = paused = 0;

    PGconn *c = pool_connect_own(p, err, errlen);
    if (!c) return -1;
    session *s = create_session(&c, err, errlen);
    if (!s) {
        if (c) PQfinish(c);
        return -1;
    }
    set_current(s);
    if (pthread_create(&heartbeat, NULL, heartbeat_main, c) != 0) {
        snprintf(err, errlen, "cannot start the heartbeat thread");
        PQfinish(c);
        return -1;
    }
    started = 1;
    return 0;
}

int sessions_started(void) { return started; }

int sessions_describe(char *id, size_t idlen, double *left, char *why, size_t whylen) {
    pthread_mutex_lock(&mu);
    session *s = cur;
    int live = s && !s->lost && mono_now() < s->deadline;
    snprintf(id, idlen, "%s", s ? s->id : "");
    *left = s ? s->deadline - mono_now() : 0;
    if (live) snprintf(why, whylen, "session %s live", s->id);
    else if (stopping) snprintf(why, whylen, "the host is stopping");
    else if (s) snprintf(why, whylen, "session %s is past its local deadline", s->id);
    else snprintf(why, whylen, "no live session; the heartbeat is starting a new one");
    pthread_mutex_unlock(&mu);
    return live;
}

session *session_current(double timeout_s) {
    pthread_once(&conds_once, cond_init);
    struct timespec ts = time_after(CLOCK_MONOTONIC, timeout_s);
    pthread_mutex_lock(&mu);
    while (!cur && !stopping && lifecycle_state() < HOST_CANCELLING)
        if (pthread_cond_timedwait(&cur_changed, &mu, &ts) != 0) break;
    session *s = cur;
    if (s) s->refs++;
    pthread_mutex_unlock(&mu);
    return s;
}

void sessions_wake_heartbeat(void) {
    pthread_mutex_lock(&mu);
    round_now = 1;
    pthread_cond_signal(&wake_heartbeat);
    pthread_mutex_unlock(&mu);
}

void sessions_pause_heartbeat(int pause) {
    pthread_mutex_lock(&mu);
    paused = pause;
    pthread_cond_signal(&wake_heartbeat);
    pthread_mutex_unlock(&mu);
}

#define END_WAIT_S 3.0 /* per attempt at ending the session */

/* The backends of connections slots still hold at shutdown: a slot that did
 * not stop may sit in an open transaction (a body suspended inside its
 * commit function) or wait on a lock forever. Cancelling its statement is
 * not enough for the first, so its backend is ended; the slot's next libpq
 * call then fails, and its locks are gone. PostgreSQL lets a role end its
 * own backends; where the server has no pg_terminate_backend (CockroachDB)
 * this does nothing and the session expires at its deadline instead.
 * Behind a pooler libpq's pids are the pooler's own (pgbouncer makes them
 * up): pool_lent_pids gives the server's, asked at connect, behind a
 * session pooler, and none behind a transaction pooler (--pooler
 * transaction), whose backends are not the slots' own: nothing is ended. */
static void terminate_lent_backends(PGconn **cp) {
    int pids[256];
    int n = pool_lent_pids(the_pool, pids, 256);
    if (n == 0 || !(*cp = heartbeat_conn(*cp))) return;
    char list[256 * 12] = "{";
    for (int i = 0; i < n; i++) {
        size_t len = strlen(list);
        snprintf(list + len, sizeof list - len, "%s%d", i ? "," : "", pids[i]);
    }
    strcat(list, "}");
    const char *params[] = {list};
    char why[600];
    PGresult *r = pool_exec_bounded(cp, "SELECT pg_terminate_backend(pid) FROM unnest($1::INT4[]) AS pid",
                               1, params, mono_now() + END_WAIT_S, why, sizeof why);
    if (r && PQresultStatus(r) == PGRES_TUPLES_OK) {
        char count[16];
        snprintf(count, sizeof count, "%d", n);
        log_kv(LOG_WARN, "ended the database backends of slots that did not stop", "count", count, NULL);
    }
    PQclear(r);
}

/* Ends s at shutdown with cfg.housekeeping->end (work.c: work it still
 * holds is recorded Canceled, since we know it stopped, and the row is
 * deleted, which cascades to the work rows). On a
 * connection of its own, so an exhausted pool cannot hold it up, and
 * bounded: a slot that never gave its transaction back (it would not stop)
 * holds a lock on the session row, and only ending that slot's backend
 * releases it. */
static void end_session(session *s) {
    const struct session_housekeeping *hk = cfg.housekeeping;
    const char *params[] = {s->id};
    char why[600] = "";
    PGconn *c = NULL;
    for (int attempt = 1; attempt <= 5; attempt++) {
        if (!(c = heartbeat_conn(c))) break;
        if (pool_exec_transaction_bounded(&c, hk->end, hk->nend, params, 1, mono_now() + END_WAIT_S, NULL, why, sizeof why) == 0) {
            log_kv(LOG_INFO, "session ended", "session", s->id, NULL);
            if (c) PQfinish(c);
            return;
        }
        log_kv(LOG_WARN, "ending the session failed; retrying", "session", s->id, "error", why, NULL);
        terminate_lent_backends(&c);
        mono_sleep(0.1 * attempt);
    }
    if (c) PQfinish(c);
    log_kv(LOG_ERROR, "could not end the session; it expires at its deadline", "session", s->id,
           "error", why, NULL);
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
        end_session(s);
        session_unref(s);
    }
    free((char *)cfg.component);
    free((char *)cfg.runtime_info);
    cfg.component = cfg.runtime_info = NULL;
    started = 0;
}
