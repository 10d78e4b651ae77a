/* pool.c -- the bounded libpq connection pool shared by every thread.
 *
 * Idle connections sit on a stack; `in_use + idle` never exceeds the
 * maximum, and a thread that would exceed it waits on a condition variable.
 * Connecting happens outside the lock so one slow server does not stall
 * threads that only return connections. */
#include "pool.h"
#include "log.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct pool {
    char *conninfo;
    int max, open;          /* open = idle + lent out */
    int nidle;
    PGconn **idle;
    pthread_mutex_t lock;
    pthread_cond_t returned;
};

pool *pool_create(const char *conninfo, int max_conns) {
    pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->conninfo = strdup(conninfo);
    p->max = max_conns < 1 ? 1 : max_conns;
    p->idle = calloc((size_t)p->max, sizeof *p->idle);
    if (!p->conninfo || !p->idle) {
        free(p->conninfo);
        free(p->idle);
        free(p);
        return NULL;
    }
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->returned, NULL);
    return p;
}

void pool_grow(pool *p, int max_conns) {
    pthread_mutex_lock(&p->lock);
    if (max_conns > p->max) {
        PGconn **idle = realloc(p->idle, (size_t)max_conns * sizeof *idle);
        if (idle) {
            p->idle = idle;
            p->max = max_conns;
            pthread_cond_broadcast(&p->returned);
        }
    }
    pthread_mutex_unlock(&p->lock);
}

void pool_destroy(pool *p) {
    if (!p) return;
    for (int i = 0; i < p->nidle; i++) PQfinish(p->idle[i]);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->returned);
    free(p->idle);
    free(p->conninfo);
    free(p);
}

void pool_describe_conn(PGconn *conn, char *buf, size_t len) {
    const char *host = PQhost(conn), *port = PQport(conn);
    const char *db = PQdb(conn), *user = PQuser(conn);
    snprintf(buf, len, "host=%s port=%s dbname=%s user=%s", host && *host ? host : "(default)",
             port && *port ? port : "(default)", db ? db : "?", user ? user : "?");
}

/* libpq messages end in a newline and may span lines; keep the first. */
static void first_line(char *dst, size_t len, const char *msg) {
    size_t n = strcspn(msg, "\n");
    if (n >= len) n = len - 1;
    memcpy(dst, msg, n);
    dst[n] = '\0';
}

/* Server notices (e.g. "already exists, skipping") are not the operator's
 * business at info level. */
static void notice_to_log(void *arg, const char *msg) {
    (void)arg;
    char line[512];
    first_line(line, sizeof line, msg);
    log_kv(LOG_DEBUG, "server notice", "notice", line, NULL);
}

PGconn *pool_connect(const char *conninfo, char *err, size_t errlen) {
    /* expand_dbname lets conninfo be a keyword string or a URI; the other
     * keywords are only defaults the caller's string can override. */
    const char *keys[] = {"dbname", "fallback_application_name", "connect_timeout", NULL};
    const char *vals[] = {conninfo, "bmdb-host", "10", NULL};
    PGconn *c = PQconnectdbParams(keys, vals, 1);
    if (!c) {
        snprintf(err, errlen, "cannot connect to database: out of memory");
        return NULL;
    }
    if (PQstatus(c) != CONNECTION_OK) {
        char where[512], why[512];
        pool_describe_conn(c, where, sizeof where);
        first_line(why, sizeof why, PQerrorMessage(c));
        snprintf(err, errlen, "cannot connect to database (%s): %s", where, why);
        PQfinish(c);
        return NULL;
    }
    PQsetNoticeProcessor(c, notice_to_log, NULL);
    return c;
}

PGconn *pool_get(pool *p, char *err, size_t errlen) {
    pthread_mutex_lock(&p->lock);
    while (p->nidle == 0 && p->open >= p->max) pthread_cond_wait(&p->returned, &p->lock);
    if (p->nidle > 0) {
        PGconn *c = p->idle[--p->nidle];
        pthread_mutex_unlock(&p->lock);
        return c;
    }
    p->open++; /* reserve the slot, then connect without the lock */
    pthread_mutex_unlock(&p->lock);

    PGconn *c = pool_connect(p->conninfo, err, errlen);
    if (!c) {
        pthread_mutex_lock(&p->lock);
        p->open--;
        pthread_cond_signal(&p->returned);
        pthread_mutex_unlock(&p->lock);
    }
    return c;
}

void pool_put(pool *p, PGconn *conn) {
    if (!conn) return;
    /* Only a clean, idle connection goes back: anything else could leak a
     * transaction (and its fence) into the next borrower. */
    int reusable = PQstatus(conn) == CONNECTION_OK && PQtransactionStatus(conn) == PQTRANS_IDLE;
    if (!reusable) PQfinish(conn);
    pthread_mutex_lock(&p->lock);
    if (reusable) p->idle[p->nidle++] = conn;
    else p->open--;
    pthread_cond_signal(&p->returned);
    pthread_mutex_unlock(&p->lock);
}
