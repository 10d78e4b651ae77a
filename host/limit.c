/* limit.c -- the local side of bmdb.limit: who waits for which limit, and
 * the release that wakes them (limit.h says what each promises). */
#include "limit.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "hash.h"
#include "log.h"
#include "pqerr.h"

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static unsigned long gens[LIMIT_BUCKETS]; /* under mu */
static limit_waiter *waiters;             /* under mu */
/* Set once a server refused pg_notify (CockroachDB): no release asks
 * again. An atomic: releases on any thread read it. */
static int no_notify;

static unsigned bucket_of(const char *name) { return (unsigned)(fnv1a64(name) % LIMIT_BUCKETS); }

unsigned long limit_gen(const char *name) {
    unsigned b = bucket_of(name);
    pthread_mutex_lock(&mu);
    unsigned long g = gens[b];
    pthread_mutex_unlock(&mu);
    return g;
}

int limit_moved(const char *name, unsigned long gen) { return limit_gen(name) != gen; }

void limit_released(const char *name) {
    int all = !name || !*name;
    unsigned b = all ? 0 : bucket_of(name);
    uint64_t one = 1;
    pthread_mutex_lock(&mu);
    for (unsigned i = 0; i < LIMIT_BUCKETS; i++)
        if (all || i == b) gens[i]++;
    for (limit_waiter *w = waiters; w; w = w->next)
        if ((all || w->bucket == b) && w->fd >= 0 && write(w->fd, &one, sizeof one) < 0) {
            /* EAGAIN: the counter is full, so the fd is readable anyway */
        }
    pthread_mutex_unlock(&mu);
}

void limit_watch(limit_waiter *w, const char *name, int fd) {
    w->fd = fd;
    w->bucket = bucket_of(name);
    pthread_mutex_lock(&mu);
    w->next = waiters;
    waiters = w;
    pthread_mutex_unlock(&mu);
}

void limit_unwatch(limit_waiter *w) {
    pthread_mutex_lock(&mu);
    for (limit_waiter **pp = &waiters; *pp; pp = &(*pp)->next)
        if (*pp == w) {
            *pp = w->next;
            break;
        }
    pthread_mutex_unlock(&mu);
}

/* After the release committed, on its connection (as control.c's). */
static void notify(PGconn *c, const char *name) {
    if (__atomic_load_n(&no_notify, __ATOMIC_RELAXED)) return;
    const char *p[] = {name};
    PGresult *r = PQexecParams(c, "SELECT pg_notify('bmdb_limit', $1)", 1, NULL, p, NULL, NULL, 0);
    const char *state = PQresultStatus(r) == PGRES_TUPLES_OK ? NULL : PQresultErrorField(r, PG_DIAG_SQLSTATE);
    if (state && (!strcmp(state, "42883") || !strcmp(state, "0A000"))) {
        __atomic_store_n(&no_notify, 1, __ATOMIC_RELAXED);
        log_kv(LOG_INFO, "server has no notifications; limit waiters on other hosts recheck on their period",
               NULL);
    }
    PQclear(r);
}

int limit_release(pool *p, session *owner, const char *name, const char *token, tx_error *e) {
    const char *params[] = {name, token};
    for (int attempt = 1;; attempt++) {
        char err[512];
        PGconn *c = pool_get(p, POOL_WAIT_S, err, sizeof err);
        if (!c) {
            tx_error_set(e, TXE_CONNECTION, "%s", err);
            return -1;
        }
        pool_lend_to(p, c, owner);
        PGresult *r = PQexecParams(c, "DELETE FROM limit_places WHERE name = $1 AND token = $2::UUID", 2, NULL,
                                   params, NULL, NULL, 0);
        if (PQresultStatus(r) == PGRES_COMMAND_OK) {
            /* After a first attempt whose answer was lost, 0 may mean
             * that attempt landed: the place was ours, and is gone. */
            int n = atoi(PQcmdTuples(r)) > 0 || attempt > 1;
            PQclear(r);
            if (n) {
                limit_released(name);
                notify(c, name);
            }
            pool_put(p, c);
            return n;
        }
        pq_error pe;
        pq_error_read(&pe, c, r);
        PQclear(r);
        pool_put(p, c); /* a broken one is closed, not kept */
        memset(e, 0, sizeof *e);
        e->kind = pe.connection_lost ? TXE_CONNECTION : TXE_SQL;
        memcpy(e->sqlstate, pe.sqlstate, sizeof e->sqlstate);
        snprintf(e->message, sizeof e->message, "releasing a place of limit %.63s: %.900s", name, pe.message);
        snprintf(e->detail, sizeof e->detail, "%s", pe.detail);
        snprintf(e->hint, sizeof e->hint, "%s", pe.hint);
        /* A DELETE is safe to send again: a first one that landed leaves
         * nothing for the second, which then says 0. */
        if (!pe.connection_lost || attempt >= 2) return -1;
    }
}
