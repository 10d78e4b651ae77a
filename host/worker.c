/* worker.c -- the worker loop's threads: slots and the listener.
 *
 * Each slot thread owns one lua_State and loops in Lua (bmdb.internal's
 * serve) until
 * the host drains, the code is reloaded (it then loads the new snapshot
 * into a fresh state and carries on), or its worker is gone. A slot only
 * leaves the Lua loop at an item boundary, so an item in flight always
 * finishes on the code that started it. A slot whose load of the new code
 * fails keeps its old state and tries again at a later boundary.
 *
 * Idle waits, wake-ups and the code generation the slots compare are in
 * slots.c, below both this file and the Lua binding.
 *
 * Globals and their guards (lock order: host/README.md):
 *   code                                  code_mu
 *   slots, live, each slot's ended        slots_mu
 *   each slot's item record               slots.c's item_mu (sched_item_read)
 *   the_pool, script_argc, script_argv    set once by workers_init, before
 *                                         any thread starts; read-only after
 *   listener, listener_started            main thread only */
#include "worker.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <lua.h>

#include "control.h"
#include "items.h"
#include "lifecycle.h"
#include "limit.h"
#include "log.h"
#include "metrics.h"
#include "lstate.h"
#include "sched.h"
#include "slots.h"
#include "snapshot.h"
#include "strays.h"

/* ---- the code and its generation --------------------------------------- */

static pthread_mutex_t code_mu = PTHREAD_MUTEX_INITIALIZER;
static snapshot *code; /* under code_mu; its generation moves on under it too */

void workers_set_code(snapshot *next) {
    pthread_mutex_lock(&code_mu);
    snapshot *old = code;
    code = snapshot_ref(next);
    if (old) snapshot_generation_advance();
    pthread_mutex_unlock(&code_mu);
    if (!old) return;
    snapshot_unref(old);
    slot_wake_everyone(); /* idle slots are at a boundary: switch now */
}

/* The current code as a new reference, and its generation. */
static snapshot *current_code(unsigned *gen) {
    pthread_mutex_lock(&code_mu);
    snapshot *s = snapshot_ref(code);
    *gen = snapshot_generation();
    pthread_mutex_unlock(&code_mu);
    return s;
}

/* ---- slots ------------------------------------------------------------------- */

#define RETRY_MAX_S 30.0 /* a slot retries a code load that failed, backing off to this */

typedef struct slot {
    worker_spec spec;            /* its worker's process, or its loop's name */
    int index;                   /* 1-based within its worker; a loop's is 1 */
    int ended;                   /* under slots_mu */
    char machine[SCHED_ITEM_LEN]; /* last claimed, "" after release (slots.h) */
    pthread_t thread;
    struct slot *next;
} slot;

/* What a slot's log lines name it by. */
static const char *slot_key(const slot *s) { return s->spec.loop ? "loop" : "process"; }

static pthread_mutex_t slots_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t slots_changed; /* CLOCK_MONOTONIC: see workers_init */
static slot *slots;
static int live;
static pool *the_pool;
static int script_argc;
static char **script_argv;

void workers_init(pool *p, int argc, char **argv) {
    the_pool = p;
    script_argc = argc;
    script_argv = argv;
    mono_cond_init(&slots_changed);
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
    lua_State *fresh = lstate_new(snap, script_argc, script_argv, &kind, err, sizeof err);
    snapshot_unref(snap);
    char idx[16], g[16], had[16];
    snprintf(idx, sizeof idx, "%d", s->index);
    snprintf(g, sizeof g, "%u", gen);
    snprintf(had, sizeof had, "%u", c->have);
    if (fresh) {
        if (c->L) lstate_close(c->L);
        if (c->retry_at > 0)
            log_kv(LOG_INFO, "slot loaded the code after failing", slot_key(s), s->spec.process, "slot", idx,
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
        log_kv(LOG_ERROR, "slot cannot load the new code; it keeps its old code and retries", slot_key(s),
               s->spec.process, "slot", idx, "generation", g, "running", had, "retry_in", retry, "error", err, NULL);
    else
        log_kv(LOG_ERROR, "slot cannot load the code; it retries", slot_key(s), s->spec.process, "slot", idx,
               "generation", g, "retry_in", retry, "error", err, NULL);
}

static void *slot_main(void *arg) {
    slot *s = arg;
    sched_bind_item(s->machine);
    if (!s->spec.loop) metrics_slot_bind(s->spec.process, s->index);
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
        int r = lstate_serve(c.L, &s->spec, s->index, c.have, c.deferred, c.retry_at, err, sizeof err);
        if (r == SERVE_ERROR) {
            log_kv(LOG_ERROR, "slot stopped by an error", slot_key(s), s->spec.process, "error", err, NULL);
            /* do not spin on a persistent error; a reload may fix it */
            lifecycle_wait(1.0, HOST_DRAINING, NULL);
            continue;
        }
        if (r != SERVE_RELOAD) break;
        load = 1;
    }
    if (c.L) lstate_close(c.L);
    if (!s->spec.loop) metrics_slot_unbind();
    pthread_mutex_lock(&slots_mu);
    s->ended = 1;
    live--;
    pthread_cond_broadcast(&slots_changed);
    pthread_mutex_unlock(&slots_mu);
    return NULL;
}

/* ---- the listener ------------------------------------------------------------ */

static pthread_t listener;
static int listener_started;

/* The listener's statements are tiny; a route that hangs must not keep it
 * (and shutdown, which joins it) waiting: the connection is given up and
 * opened again. */
#define LISTENER_WAIT_S 5.0

/* A connection of its own, outside the pool's bound like the heartbeat's:
 * its statements are bounded (pool_exec_bounded), which closes it when one
 * gets no answer, and closing is how it stops listening. */
static PGconn *listen_conn(void) {
    char err[512];
    PGconn *c = pool_connect_own(the_pool, err, sizeof err);
    if (!c) return NULL;
    /* Behind a transaction pooler a LISTEN holds on whichever backend ran
     * it, for whichever client gets that backend next: none here (idle
     * slots poll, as said at start). The connection stays, for the fleet
     * wake-ups it sends: a NOTIFY is a statement like any other. */
    if (pool_transaction_pooled()) return c;
    /* bmdb_cancel: an operator canceled a lock; the payload is its token.
     * bmdb_limit: a place of a limit was given back; the payload is its
     * name (limit.h). */
    static const char *const listens[] = {"LISTEN bmdb_wake", "LISTEN bmdb_cancel", "LISTEN bmdb_limit"};
    for (int i = 0; i < 3; i++) {
        PGresult *r = pool_exec_bounded(&c, listens[i], 0, NULL, mono_now() + LISTENER_WAIT_S, err, sizeof err);
        int ok = PQresultStatus(r) == PGRES_COMMAND_OK;
        const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
        if (!ok && state && !strcmp(state, "0A000")) {
            /* CockroachDB: no LISTEN. Slots poll; nothing else changes. */
            log_kv(LOG_INFO, "server has no LISTEN; idle slots poll", NULL);
            PQclear(r);
            PQfinish(c);
            return (PGconn *)-1;
        }
        PQclear(r);
        if (!ok) {
            if (c) PQfinish(c);
            return NULL;
        }
    }
    slot_set_notify_enabled();
    slot_wake(NULL); /* we may have missed notifications while away */
    limit_released(NULL);
    return c;
}

/* One NOTIFY for every fleet wake-up requested since the last (slots.h),
 * then a short pause so that the next burst is folded into one again. Its
 * own notification comes back to this connection and wakes local slots
 * too. 0, or -1 when the connection broke or hung (then given up). */
static int send_fleet_wake(PGconn **c) {
    if (!slot_fleet_wake_take()) return 0;
    char why[512] = "";
    PGresult *r = pool_exec_bounded(c, "SELECT pg_notify('bmdb_wake', '')", 0, NULL,
                                    mono_now() + LISTENER_WAIT_S, why, sizeof why);
    if (r && PQresultStatus(r) != PGRES_TUPLES_OK) pool_result_failed(c, r, why, sizeof why);
    PQclear(r);
    if (!*c) { /* no answer in time, or the connection broke: given up */
        log_kv(LOG_WARN, "listener connection lost; reconnecting", "error", why, NULL);
        return -1;
    }
    mono_sleep(SLOT_FLEET_WAKE_S);
    return 0;
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
        struct pollfd pfd[2] = {{.fd = PQsocket(c), .events = POLLIN},
                                {.fd = slot_fleet_wake_fd(), .events = POLLIN}};
        int n = poll(pfd, 2, 250); /* short: notices shutdown promptly */
        if (n > 0 && pfd[1].revents && send_fleet_wake(&c) < 0) continue;
        if (n > 0 && pfd[0].revents && !PQconsumeInput(c)) {
            log_kv(LOG_WARN, "listener connection lost; reconnecting", NULL);
            PQfinish(c);
            c = NULL;
            continue;
        }
        PGnotify *note;
        while ((note = PQnotifies(c))) {
            if (!slot_notify_enabled()) { /* a pooled backend's leftover LISTEN: not ours */
                PQfreemem(note);
                continue;
            }
            if (!strcmp(note->relname, "bmdb_cancel")) items_lost_token(note->extra, "canceled by an operator");
            else if (!strcmp(note->relname, "bmdb_limit")) limit_released(note->extra);
            else slot_wake(note->extra);
            PQfreemem(note);
        }
    }
    if (c) PQfinish(c); /* no UNLISTEN: closing stops listening, and cannot hang */
    return NULL;
}

/* ---- the supervisor ----------------------------------------------------------- */

int workers_start(const worker_spec *specs, int nspecs) {
    if (!listener_started && pthread_create(&listener, NULL, listener_main, NULL) == 0) listener_started = 1;
    const char *names[256];
    int nnames = 0;
    for (int i = 0; i < nspecs && nnames < 256; i++)
        if (!specs[i].loop) names[nnames++] = specs[i].process;
    control_register(the_pool, names, nnames); /* holds block them in work_blocked */
    strays_enable(); /* this host's claims now run unattended: look for rows they left */
    pthread_mutex_lock(&slots_mu);
    for (int i = 0; i < nspecs; i++) {
        /* Slots above a lowered concurrency end themselves (serve
         * returns "removed"); only missing ones are started here. Records
         * of ended slots stay until workers_stop() joins them. */
        for (int idx = 1; idx <= specs[i].concurrency; idx++) {
            int running = 0;
            for (slot *s = slots; s; s = s->next)
                if (!strcmp(s->spec.process, specs[i].process) && s->spec.loop == specs[i].loop &&
                    s->index == idx && !s->ended)
                    running = 1;
            if (running) continue;
            slot *s = calloc(1, sizeof *s);
            s->spec = specs[i];
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
    struct timespec until = time_after(CLOCK_MONOTONIC, seconds);
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
        char idx[16], machine[SCHED_ITEM_LEN];
        snprintf(idx, sizeof idx, "%d", s->index);
        sched_item_read(s->machine, machine, sizeof machine);
        log_kv(LOG_ERROR, "slot did not stop; left behind (a loop compiled by the JIT ignores the interrupt)",
               slot_key(s), s->spec.process, "slot", idx, "machine", *machine ? machine : "none", NULL);
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
