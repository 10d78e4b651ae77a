/* worker.c -- the worker loop's threads: slots, idle waits, the listener.
 *
 * Each slot thread owns one lua_State and loops in Lua (bmdb._serve) until
 * the host drains, the code is reloaded (it then loads the new snapshot
 * into a fresh state and carries on), or its worker is gone. A slot only
 * leaves the Lua loop at an item boundary, so an item in flight always
 * finishes on the code that started it. A slot whose load of the new code
 * fails keeps its old state and tries again at a later boundary.
 *
 * Idle slots wait per process. A wake-up is a token handed to ONE waiter;
 * a slot that then claims something passes a token on (bmdb._serve calls
 * worker_wake), so a burst of new machines ramps every slot up while a
 * single NOTIFY costs a single query. A token left when nobody waits is
 * kept (one), closing the race between "found nothing" and going to sleep. */
#include "worker.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lua.h>

#include "lbmdb.h"
#include "lifecycle.h"
#include "log.h"
#include "snapshot.h"

/* ---- idle waits ---------------------------------------------------------- */

typedef struct idle_queue {
    char process[64];
    int waiting, tokens;
    pthread_cond_t cv;
    struct idle_queue *next;
} idle_queue;

static pthread_mutex_t idle_mu = PTHREAD_MUTEX_INITIALIZER;
static idle_queue *queues;
static unsigned everyone_gen; /* bumped by worker_wake_everyone */

static idle_queue *queue_for(const char *process) {
    for (idle_queue *q = queues; q; q = q->next)
        if (!strcmp(q->process, process)) return q;
    idle_queue *q = calloc(1, sizeof *q);
    snprintf(q->process, sizeof q->process, "%s", process);
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(&q->cv, &a);
    pthread_condattr_destroy(&a);
    q->next = queues;
    queues = q;
    return q;
}

int worker_idle_wait(const char *process, double seconds) {
    struct timespec until = time_after(CLOCK_MONOTONIC, seconds);
    pthread_mutex_lock(&idle_mu);
    idle_queue *q = queue_for(process);
    unsigned gen = everyone_gen;
    int woken = 0;
    q->waiting++;
    while (!q->tokens && gen == everyone_gen && lifecycle_state() == HOST_RUNNING)
        if (pthread_cond_timedwait(&q->cv, &idle_mu, &until) == ETIMEDOUT) break;
    if (q->tokens) {
        q->tokens--;
        woken = 1;
    }
    q->waiting--;
    pthread_mutex_unlock(&idle_mu);
    return woken;
}

static void wake_one(idle_queue *q) {
    /* At most one token per waiter, and one in reserve for a slot that is
     * about to wait. */
    if (q->tokens < (q->waiting > 0 ? q->waiting : 1)) q->tokens++;
    pthread_cond_signal(&q->cv);
}

void worker_wake(const char *process) {
    pthread_mutex_lock(&idle_mu);
    if (!process || !*process)
        for (idle_queue *q = queues; q; q = q->next) wake_one(q);
    else
        wake_one(queue_for(process));
    pthread_mutex_unlock(&idle_mu);
}

void worker_wake_everyone(void) {
    pthread_mutex_lock(&idle_mu);
    everyone_gen++;
    for (idle_queue *q = queues; q; q = q->next) pthread_cond_broadcast(&q->cv);
    pthread_mutex_unlock(&idle_mu);
}

/* ---- counters --------------------------------------------------------------- */

static unsigned long claims_total, retries_total;

void worker_count_claim(void) { __atomic_add_fetch(&claims_total, 1, __ATOMIC_RELAXED); }
void worker_count_retry(void) { __atomic_add_fetch(&retries_total, 1, __ATOMIC_RELAXED); }

void worker_counts(unsigned long *claims, unsigned long *retries) {
    *claims = __atomic_load_n(&claims_total, __ATOMIC_RELAXED);
    *retries = __atomic_load_n(&retries_total, __ATOMIC_RELAXED);
}

/* ---- the code and its generation --------------------------------------- */

static pthread_mutex_t code_mu = PTHREAD_MUTEX_INITIALIZER;
static snapshot *code;          /* under code_mu */
static unsigned generation = 1; /* written under code_mu, read atomically */

unsigned workers_generation(void) { return __atomic_load_n(&generation, __ATOMIC_ACQUIRE); }

void workers_set_code(snapshot *next) {
    pthread_mutex_lock(&code_mu);
    snapshot *old = code;
    code = snapshot_ref(next);
    if (old) __atomic_add_fetch(&generation, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&code_mu);
    if (!old) return;
    snapshot_unref(old);
    worker_wake_everyone(); /* idle slots are at a boundary: switch now */
}

/* The current code as a new reference, and its generation. */
static snapshot *current_code(unsigned *gen) {
    pthread_mutex_lock(&code_mu);
    snapshot *s = snapshot_ref(code);
    *gen = generation;
    pthread_mutex_unlock(&code_mu);
    return s;
}

/* ---- slots ------------------------------------------------------------------- */

#define RETRY_MAX_S 30.0 /* a slot retries a code load that failed, backing off to this */

typedef struct slot {
    char process[64];
    int index;        /* 1-based within its worker */
    int ended;        /* under slots_mu */
    char machine[40]; /* last claimed, "" after release; under slots_mu */
    pthread_t thread;
    struct slot *next;
} slot;

static pthread_mutex_t slots_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t slots_changed = PTHREAD_COND_INITIALIZER;
static slot *slots;
static int live;
static int script_argc;
static char **script_argv;
static __thread slot *self; /* the calling thread's slot, NULL elsewhere */

void worker_note_item(const char *machine) {
    if (!self) return;
    pthread_mutex_lock(&slots_mu);
    snprintf(self->machine, sizeof self->machine, "%s", machine ? machine : "");
    pthread_mutex_unlock(&slots_mu);
}

/* A slot's code: the state it runs, its generation, and the retry of a
 * load that failed. */
typedef struct slot_code {
    lua_State *L;      /* NULL until a load succeeds */
    unsigned have;     /* the generation L runs */
    unsigned deferred; /* a generation that failed to load */
    double retry_at;   /* monotonic; 0: no retry pending */
    double delay;
} slot_code;

/* Loads the current code into a fresh state. On success it replaces the
 * old state; on failure (the validated snapshot ran into a runtime error
 * in this state: something random, the environment) the slot keeps its
 * old state and generation and retries later, backing off: a slot never
 * counts itself on code it could not load. */
static void slot_load(slot *s, slot_code *c) {
    char err[4096];
    unsigned gen;
    snapshot *snap = current_code(&gen);
    int kind;
    lua_State *fresh = lbmdb_script_state(snap, script_argc, script_argv, &kind, err, sizeof err);
    snapshot_unref(snap);
    char idx[16], g[16], had[16];
    snprintf(idx, sizeof idx, "%d", s->index);
    snprintf(g, sizeof g, "%u", gen);
    snprintf(had, sizeof had, "%u", c->have);
    if (fresh) {
        if (c->L) lbmdb_close_state(c->L);
        if (c->retry_at > 0)
            log_kv(LOG_INFO, "slot loaded the code after failing", "process", s->process, "slot", idx,
                   "generation", g, NULL);
        *c = (slot_code){.L = fresh, .have = gen, .delay = 1};
        return;
    }
    if (lifecycle_state() != HOST_RUNNING) return; /* stopping: nothing to retry */
    if (c->delay <= 0) c->delay = 1;
    c->deferred = gen;
    c->retry_at = mono_now() + c->delay;
    char retry[32];
    snprintf(retry, sizeof retry, "%.0fs", c->delay);
    c->delay = c->delay * 2 > RETRY_MAX_S ? RETRY_MAX_S : c->delay * 2;
    if (c->L)
        log_kv(LOG_ERROR, "slot cannot load the new code; it keeps its old code and retries", "process",
               s->process, "slot", idx, "generation", g, "running", had, "retry_in", retry, "error", err, NULL);
    else
        log_kv(LOG_ERROR, "slot cannot load the code; it retries", "process", s->process, "slot", idx,
               "generation", g, "retry_in", retry, "error", err, NULL);
}

static void *slot_main(void *arg) {
    slot *s = arg;
    self = s;
    char err[4096];
    slot_code c = {0};
    int load = 1;
    while (lifecycle_state() == HOST_RUNNING) {
        if (load) slot_load(s, &c);
        load = 0;
        if (!c.L) { /* nothing to run yet: wait for the retry */
            lifecycle_wait(c.retry_at - mono_now(), HOST_DRAINING, NULL);
            load = 1;
            continue;
        }
        int r = lbmdb_serve(c.L, s->process, s->index, c.have, c.deferred, c.retry_at, err, sizeof err);
        if (r == SERVE_ERROR) {
            log_kv(LOG_ERROR, "slot stopped by an error", "process", s->process, "error", err, NULL);
            /* do not spin on a persistent error; a reload may fix it */
            lifecycle_wait(1.0, HOST_DRAINING, NULL);
            continue;
        }
        if (r != SERVE_RELOAD) break;
        load = 1;
    }
    if (c.L) lbmdb_close_state(c.L);
    pthread_mutex_lock(&slots_mu);
    s->ended = 1;
    live--;
    pthread_cond_broadcast(&slots_changed);
    pthread_mutex_unlock(&slots_mu);
    return NULL;
}

/* ---- the listener ------------------------------------------------------------ */

static pool *the_pool;
static pthread_t listener;
static int listener_started, notify_enabled;

int worker_notify_enabled(void) { return __atomic_load_n(&notify_enabled, __ATOMIC_ACQUIRE); }

static PGconn *listen_conn(void) {
    char err[512];
    PGconn *c = pool_get(the_pool, err, sizeof err);
    if (!c) return NULL;
    PGresult *r = PQexec(c, "LISTEN bmdb_wake");
    int ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    const char *state = PQresultErrorField(r, PG_DIAG_SQLSTATE);
    if (!ok && state && !strcmp(state, "0A000")) {
        /* CockroachDB: no LISTEN. Slots poll; nothing else changes. */
        log_kv(LOG_INFO, "server has no LISTEN; idle slots poll", NULL);
        PQclear(r);
        pool_put(the_pool, c);
        return (PGconn *)-1;
    }
    PQclear(r);
    if (!ok) {
        pool_put(the_pool, c);
        return NULL;
    }
    __atomic_store_n(&notify_enabled, 1, __ATOMIC_RELEASE);
    worker_wake(NULL); /* we may have missed notifications while away */
    return c;
}

static void *listener_main(void *arg) {
    (void)arg;
    PGconn *c = NULL;
    while (lifecycle_state() == HOST_RUNNING) {
        if (!c) {
            c = listen_conn();
            if (c == (PGconn *)-1) return NULL;
            if (!c) {
                lifecycle_wait(1.0, HOST_DRAINING, NULL);
                continue;
            }
        }
        struct pollfd pfd = {.fd = PQsocket(c), .events = POLLIN};
        int n = poll(&pfd, 1, 250); /* short: notices shutdown promptly */
        if (n > 0 && !PQconsumeInput(c)) {
            log_kv(LOG_WARN, "listener connection lost; reconnecting", NULL);
            pool_put(the_pool, c); /* broken: the pool closes it */
            c = NULL;
            continue;
        }
        PGnotify *note;
        while ((note = PQnotifies(c))) {
            worker_wake(note->extra);
            PQfreemem(note);
        }
    }
    if (c) {
        PQclear(PQexec(c, "UNLISTEN *"));
        pool_put(the_pool, c);
    }
    return NULL;
}

/* ---- the supervisor ----------------------------------------------------------- */

int workers_start(pool *p, int argc, char **argv, const worker_spec *specs, int nspecs) {
    the_pool = p;
    script_argc = argc;
    script_argv = argv;
    if (!listener_started && pthread_create(&listener, NULL, listener_main, NULL) == 0) listener_started = 1;
    pthread_mutex_lock(&slots_mu);
    for (int i = 0; i < nspecs; i++) {
        /* Slots above a lowered concurrency end themselves (bmdb._serve
         * returns "removed"); only missing ones are started here. Records
         * of ended slots stay until workers_stop() joins them. */
        for (int idx = 1; idx <= specs[i].concurrency; idx++) {
            int running = 0;
            for (slot *s = slots; s; s = s->next)
                if (!strcmp(s->process, specs[i].process) && s->index == idx && !s->ended) running = 1;
            if (running) continue;
            slot *s = calloc(1, sizeof *s);
            snprintf(s->process, sizeof s->process, "%s", specs[i].process);
            s->index = idx;
            if (pthread_create(&s->thread, NULL, slot_main, s) != 0) {
                free(s);
                continue;
            }
            s->next = slots;
            slots = s;
            live++;
        }
    }
    pthread_mutex_unlock(&slots_mu);
    return 0;
}

int workers_live(void) {
    pthread_mutex_lock(&slots_mu);
    int n = live;
    pthread_mutex_unlock(&slots_mu);
    return n;
}

int workers_wait(double seconds) {
    struct timespec until = time_after(CLOCK_REALTIME, seconds);
    pthread_mutex_lock(&slots_mu);
    while (live > 0)
        if (pthread_cond_timedwait(&slots_changed, &slots_mu, &until) == ETIMEDOUT) break;
    int n = live;
    pthread_mutex_unlock(&slots_mu);
    return n;
}

int workers_report_stuck(void) {
    int n = 0;
    pthread_mutex_lock(&slots_mu);
    for (slot *s = slots; s; s = s->next) {
        if (s->ended) continue;
        char idx[16];
        snprintf(idx, sizeof idx, "%d", s->index);
        log_kv(LOG_ERROR, "slot did not stop; left behind (a loop compiled by the JIT ignores the interrupt)",
               "process", s->process, "slot", idx, "machine", *s->machine ? s->machine : "none", NULL);
        n++;
    }
    pthread_mutex_unlock(&slots_mu);
    return n;
}

void workers_stop(void) {
    if (listener_started) pthread_join(listener, NULL);
    listener_started = 0;
    pthread_mutex_lock(&slots_mu);
    slot *s = slots;
    slots = NULL;
    pthread_mutex_unlock(&slots_mu);
    while (s) {
        slot *next = s->next;
        pthread_join(s->thread, NULL);
        free(s);
        s = next;
    }
    pthread_mutex_lock(&code_mu);
    snapshot *old = code;
    code = NULL;
    pthread_mutex_unlock(&code_mu);
    snapshot_unref(old);
}
