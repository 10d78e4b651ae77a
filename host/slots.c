/* slots.c -- what the slot threads share with the Lua they run.
 *
 * Globals and their guards (lock order: host/README.md):
 *   queues, everyone_gen, each queue's counts   idle_mu
 *   finishing, claiming, claim queues           phase_mu (never held with
 *                                               idle_mu or item_mu)
 *   item records bound by slot_bind_item        item_mu
 *   generation, claims/retries, notify          atomics, no lock */
#define _GNU_SOURCE /* pthread_mutex_clocklock */
#include "slots.h"

#include <stdint.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lifecycle.h"
#include "log.h"
#include "metrics.h"
#include "strays.h"

/* ---- idle waits ---------------------------------------------------------- */

typedef struct idle_queue {
    char process[64];
    int waiting, tokens;
    int polling; /* one waiter keeps the poll interval (slot_idle_wait) */
    pthread_cond_t cv; /* CLOCK_MONOTONIC */
    struct idle_queue *next;
} idle_queue;

static pthread_mutex_t idle_mu = PTHREAD_MUTEX_INITIALIZER;
static idle_queue *queues;    /* under idle_mu; never freed (one per process) */
static unsigned everyone_gen; /* under idle_mu; bumped by slot_wake_everyone */

static idle_queue *queue_for(const char *process) {
    for (idle_queue *q = queues; q; q = q->next)
        if (!strcmp(q->process, process)) return q;
    idle_queue *q = calloc(1, sizeof *q);
    snprintf(q->process, sizeof q->process, "%s", process);
    mono_cond_init(&q->cv);
    q->next = queues;
    queues = q;
    return q;
}

/* Idle slots of a process take turns at polling, so that 16 idle slots
 * cost the database one claim per poll interval, not 16. One waiter, the
 * poller, sleeps the interval; the others sleep IDLE_FOLLOWER_POLLS times
 * as long, a safety net only. Nothing is found later for it: a poller
 * that wakes claims; finding nothing, it comes back and polls again;
 * finding something, it passes the baton (slot_wake after a claim), the
 * woken follower claims and passes it on, and the first slot back finds
 * the post free and takes it. So whenever every slot waits, one polls.
 * Wake-ups (NOTIFY, the baton) go to any waiter, poller or not. */
#define IDLE_FOLLOWER_POLLS 60

int slot_idle_wait(const char *process, double seconds) {
    pthread_mutex_lock(&idle_mu);
    idle_queue *q = queue_for(process);
    int poller = !q->polling;
    if (poller) q->polling = 1;
    struct timespec until = time_after(CLOCK_MONOTONIC, poller ? seconds : seconds * IDLE_FOLLOWER_POLLS);
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
    if (poller) q->polling = 0;
    pthread_mutex_unlock(&idle_mu);
    return woken;
}

static void wake_one(idle_queue *q) {
    /* At most one token per waiter, and one in reserve for a slot that is
     * about to wait. */
    if (q->tokens < (q->waiting > 0 ? q->waiting : 1)) q->tokens++;
    pthread_cond_signal(&q->cv);
}

void slot_wake(const char *process) {
    pthread_mutex_lock(&idle_mu);
    if (!process || !*process)
        for (idle_queue *q = queues; q; q = q->next) wake_one(q);
    else
        wake_one(queue_for(process));
    pthread_mutex_unlock(&idle_mu);
}

void slot_wake_everyone(void) {
    pthread_mutex_lock(&idle_mu);
    everyone_gen++;
    for (idle_queue *q = queues; q; q = q->next) pthread_cond_broadcast(&q->cv);
    pthread_mutex_unlock(&idle_mu);
}

/* ---- claims and finishes take turns --------------------------------------
 *
 * Why (measured, BENCHMARKS.md): under SERIALIZABLE on PostgreSQL, a claim
 * that overlaps a finish is a "pivot" and is rolled back. The claim reads
 * what finishes write (the worker's select scans the tables a finish
 * deletes from; the work table is read whole), and finishes read what the
 * claim writes (their fence and release read the work table's primary key
 * index, whose few pages take every new work row: predicate locks on a
 * btree are per page). Two concurrent claims conflict the same way. At 16
 * slots a quarter of the claims were retried after a sleep, and the
 * slots spent most of their time asleep. So within a host a claim runs
 * alone: it waits for the finishes in flight, and finishes wait while it
 * runs (and once it has waited CLAIM_URGENT_S, so that a steady stream of
 * finishes cannot starve it). Finishes run together: they do not
 * conflict with each other.
 *
 * A claim that runs alone would make claims the bottleneck, so it claims
 * for every slot of its process that waits to claim: they wait here, and
 * the claimer hands each of them an item (slot_claim_hand). A waiter that
 * gets none takes the next turn. Other hosts still overlap; their claims
 * conflict as before. */

typedef struct claim_queue {
    char process[64];
    int waiters;                /* slots of process inside slot_claim_enter */
    int n;                      /* items queued, oldest first */
    int counted;                /* of them, those counted in items_handed */
    int waiting_shown;          /* the rest, as the metrics last showed them */
    int give_back;              /* slot_claim_give_back */
    slot_handed items[SLOT_HAND_MAX];
    struct claim_queue *next;
} claim_queue;

static pthread_mutex_t phase_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t phase_cv; /* CLOCK_MONOTONIC */
static pthread_once_t phase_once = PTHREAD_ONCE_INIT;
/* under phase_mu: */
static int finishing, claiming, claims_waiting;
static double claims_waiting_since; /* mono_now() when claims_waiting left 0 */
#define CLAIM_URGENT_S 0.05
static claim_queue *claim_queues; /* never freed (one per process) */
/* Items handed and not yet taken, in every queue (written under phase_mu)
 * or straight to a slot (slot_note_handed); read by slot_items_held (a
 * slot handed one holds it). Of a queue's items only as many count as
 * slots wait there: the rest were claimed ahead (the worker's `ahead`),
 * and no slot holds them until one comes back for its next item. */
static int items_handed;
/* Items queued beyond the slots that wait for one (claimed ahead), in
 * every queue: what the metrics show, summed; read by slot_items_ahead. */
static int items_ahead;

static void phase_init(void) { mono_cond_init(&phase_cv); }

/* Under phase_mu, after q->n or q->waiters changed. */
static void recount(claim_queue *q) {
    int now = q->n < q->waiters ? q->n : q->waiters;
    __atomic_add_fetch(&items_handed, now - q->counted, __ATOMIC_RELAXED);
    q->counted = now;
    int ahead = q->n - now;
    if (ahead != q->waiting_shown) {
        __atomic_add_fetch(&items_ahead, ahead - q->waiting_shown, __ATOMIC_RELAXED);
        metrics_items_waiting(q->process, q->waiting_shown = ahead);
    }
}

/* Under phase_mu: the oldest queued item, so an item claimed ahead waits
 * no longer than the ones claimed after it. */
static void take_oldest(claim_queue *q, slot_handed *out) {
    *out = q->items[0];
    memmove(q->items, q->items + 1, (size_t)(--q->n) * sizeof q->items[0]);
}

static claim_queue *claim_queue_for(const char *process) {
    for (claim_queue *q = claim_queues; q; q = q->next)
        if (!strcmp(q->process, process)) return q;
    claim_queue *q = calloc(1, sizeof *q);
    if (!q) abort();
    snprintf(q->process, sizeof q->process, "%s", process);
    q->next = claim_queues;
    claim_queues = q;
    return q;
}

void slot_finish_enter(void) {
    pthread_once(&phase_once, phase_init);
    pthread_mutex_lock(&phase_mu);
    /* A claim in progress excludes us. A claim that waits does not, at
     * first: finishes of the slots still busy end soon, and each slot
     * that waits to claim stops finishing, so the turn comes; a claim
     * that has waited CLAIM_URGENT_S makes new finishes wait too, so a
     * steady stream of finishes cannot starve it. */
    while (claiming || (claims_waiting && mono_now() - claims_waiting_since >= CLAIM_URGENT_S))
        pthread_cond_wait(&phase_cv, &phase_mu);
    finishing++;
    pthread_mutex_unlock(&phase_mu);
}

void slot_finish_leave(void) {
    pthread_mutex_lock(&phase_mu);
    if (--finishing == 0) pthread_cond_broadcast(&phase_cv);
    pthread_mutex_unlock(&phase_mu);
}

int slot_claim_enter(const char *process, double seconds, slot_handed *out) {
    pthread_once(&phase_once, phase_init);
    struct timespec until = time_after(CLOCK_MONOTONIC, seconds);
    int got = SLOT_CLAIM_TIMEOUT;
    pthread_mutex_lock(&phase_mu);
    claim_queue *q = claim_queue_for(process);
    q->waiters++;
    recount(q);
    if (claims_waiting++ == 0) claims_waiting_since = mono_now();
    for (;;) {
        if (q->n > 0) {
            take_oldest(q, out);
            got = SLOT_CLAIM_HANDED;
            break;
        }
        if (!claiming && !finishing) {
            claiming = 1;
            got = SLOT_CLAIM_TURN;
            break;
        }
        if (lifecycle_state() != HOST_RUNNING) break;
        if (pthread_cond_timedwait(&phase_cv, &phase_mu, &until) == ETIMEDOUT) break;
    }
    q->waiters--;
    recount(q);
    claims_waiting--;
    /* Finishes wait while claims wait: one that gave up may free them. */
    if (got == SLOT_CLAIM_TIMEOUT) pthread_cond_broadcast(&phase_cv);
    pthread_mutex_unlock(&phase_mu);
    if (got == SLOT_CLAIM_HANDED) slot_note_item(out->machine);
    return got;
}

int slot_claim_alongside(int finishes) {
    pthread_once(&phase_once, phase_init);
    pthread_mutex_lock(&phase_mu);
    int got = !claiming && finishing == finishes;
    if (got) claiming = 1;
    pthread_mutex_unlock(&phase_mu);
    return got;
}

int slot_claim_waiters(const char *process) {
    pthread_mutex_lock(&phase_mu);
    claim_queue *q = claim_queue_for(process);
    int n = q->waiters - q->n;
    pthread_mutex_unlock(&phase_mu);
    return n > 0 ? n : 0;
}

int slot_items_ahead(void) { return __atomic_load_n(&items_ahead, __ATOMIC_RELAXED); }

int slot_claim_queued(const char *process) {
    pthread_mutex_lock(&phase_mu);
    int n = claim_queue_for(process)->n;
    pthread_mutex_unlock(&phase_mu);
    return n;
}

int slot_claim_hand(const char *process, const slot_handed *item) {
    pthread_mutex_lock(&phase_mu);
    claim_queue *q = claim_queue_for(process);
    int ok = q->n < SLOT_HAND_MAX;
    if (ok) {
        q->items[q->n++] = *item;
        recount(q);
    }
    pthread_mutex_unlock(&phase_mu);
    return ok;
}

void slot_claim_leave(void) {
    pthread_mutex_lock(&phase_mu);
    claiming = 0;
    pthread_cond_broadcast(&phase_cv);
    pthread_mutex_unlock(&phase_mu);
}

int slot_claim_take(const char *process, slot_handed *out) {
    pthread_mutex_lock(&phase_mu);
    claim_queue *q = claim_queue_for(process);
    int got = q->n > 0;
    if (got) {
        take_oldest(q, out);
        recount(q);
    }
    pthread_mutex_unlock(&phase_mu);
    return got;
}

void slot_claim_give_back(const char *process, int on) {
    pthread_mutex_lock(&phase_mu);
    claim_queue_for(process)->give_back = on;
    pthread_mutex_unlock(&phase_mu);
}

int slot_give_back_waiting(void) {
    slot_handed stale[SLOT_HAND_MAX];
    char process[SLOT_HAND_MAX][64];
    int n = 0;
    double before = mono_now() - SLOT_GIVE_BACK_S;
    pthread_mutex_lock(&phase_mu);
    for (claim_queue *q = claim_queues; q; q = q->next) {
        int k = 0; /* the oldest come first */
        while (q->give_back && k < q->n && q->items[k].started <= before && n < SLOT_HAND_MAX) {
            snprintf(process[n], sizeof process[n], "%s", q->process);
            stale[n++] = q->items[k++];
        }
        if (k == 0) continue;
        q->n -= k;
        memmove(q->items, q->items + k, (size_t)q->n * sizeof q->items[0]);
        recount(q);
    }
    pthread_mutex_unlock(&phase_mu);
    for (int i = 0; i < n; i++) {
        log_kv(LOG_INFO, "item claimed ahead given back: it waited in the host too long", "machine",
               stale[i].machine, "process", process[i], NULL);
        metrics_item_given_back(process[i]);
        strays_give_back(stale[i].token);
    }
    return n;
}

/* ---- generation, counters, notify ------------------------------------------ */

static unsigned generation = 1;
static unsigned long claims_total, retries_total;
static int notify_enabled;

unsigned slot_generation(void) { return __atomic_load_n(&generation, __ATOMIC_ACQUIRE); }
void slot_generation_advance(void) { __atomic_add_fetch(&generation, 1, __ATOMIC_RELEASE); }

void slot_count_claim(void) { __atomic_add_fetch(&claims_total, 1, __ATOMIC_RELAXED); }
void slot_count_retry(void) { __atomic_add_fetch(&retries_total, 1, __ATOMIC_RELAXED); }

void slot_counts(unsigned long *claims, unsigned long *retries) {
    *claims = __atomic_load_n(&claims_total, __ATOMIC_RELAXED);
    *retries = __atomic_load_n(&retries_total, __ATOMIC_RELAXED);
}

int slot_notify_enabled(void) { return __atomic_load_n(&notify_enabled, __ATOMIC_ACQUIRE); }
void slot_set_notify_enabled(void) { __atomic_store_n(&notify_enabled, 1, __ATOMIC_RELEASE); }

/* ---- fleet wake-ups ----------------------------------------------------------- */

static pthread_once_t fleet_once = PTHREAD_ONCE_INIT;
static int fleet_fd = -1; /* eventfd: its counter is the pending requests */
/* A request is written to fleet_fd already and not yet taken: the next
 * ones need no write (one syscall fewer per release in a burst). */
static int fleet_pending;

static void fleet_init(void) { fleet_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC); }

int slot_fleet_wake_fd(void) {
    pthread_once(&fleet_once, fleet_init);
    return fleet_fd;
}

void slot_fleet_wake_request(void) {
    uint64_t one = 1;
    if (__atomic_exchange_n(&fleet_pending, 1, __ATOMIC_ACQ_REL)) return;
    if (slot_fleet_wake_fd() < 0 || write(fleet_fd, &one, sizeof one) < 0) { /* counter full: pending anyway */ }
}

int slot_fleet_wake_take(void) {
    uint64_t n = 0;
    int got = slot_fleet_wake_fd() >= 0 && read(fleet_fd, &n, sizeof n) == sizeof n && n > 0;
    /* Cleared after the read: a request between the two is served by the
     * NOTIFY the caller sends next (it comes after that request's commit);
     * one after it writes again. */
    __atomic_store_n(&fleet_pending, 0, __ATOMIC_RELEASE);
    return got;
}

/* ---- the item each slot holds ---------------------------------------------- */

static pthread_mutex_t item_mu = PTHREAD_MUTEX_INITIALIZER;
static __thread char *item; /* the calling slot's record; NULL on other threads */

void slot_bind_item(char *record) { item = record; }

static int items_held; /* records that name an item; written under item_mu */

void slot_note_item(const char *machine) {
    if (!item) return;
    pthread_mutex_lock(&item_mu);
    int was = item[0] != '\0', is = machine && machine[0];
    if (was != is) __atomic_add_fetch(&items_held, is ? 1 : -1, __ATOMIC_RELAXED);
    snprintf(item, SLOT_ITEM_LEN, "%s", machine ? machine : "");
    pthread_mutex_unlock(&item_mu);
}

void slot_note_handed(int delta) { __atomic_add_fetch(&items_handed, delta, __ATOMIC_RELAXED); }

int slot_items_held(void) {
    return __atomic_load_n(&items_held, __ATOMIC_RELAXED) +
           __atomic_load_n(&items_handed, __ATOMIC_RELAXED);
}

void slot_item_read(const char *record, char *out, size_t len) {
    pthread_mutex_lock(&item_mu);
    snprintf(out, len, "%s", record);
    pthread_mutex_unlock(&item_mu);
}
