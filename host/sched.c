/* sched.c -- claims and finishes take turns; the queues of handed items;
 * give-back (sched.h). The batch of finishes is sched_batch.c.
 *
 * Why the turns: under SERIALIZABLE on PostgreSQL, a claim that overlaps
 * a finish is a "pivot" and is rolled back. The claim reads what finishes
 * write (the worker's select scans the tables a finish deletes from; the
 * work table is read whole), and finishes read what the claim writes
 * (their fence and release read the work table's primary key index, whose
 * few pages take every new work row: predicate locks on a btree are per
 * page). Two concurrent claims conflict the same way. Retried claims
 * sleep, and with several slots most of their time went there. So within
 * a host a claim runs alone, and finishes run together: they do not
 * conflict with each other. A claim that runs alone would make claims
 * the bottleneck, so it claims for every slot of its process that waits
 * to claim: they wait here, and the claimer hands each of them an item.
 * Other hosts still overlap; their claims conflict as before.
 *
 * It keeps the scheduler's invariants 1 to 5 (docs/internals.md, "The
 * scheduler's invariants"; sched_batch.c keeps 6 to 10): each routine
 * that keeps one names its number.
 *
 * Globals: everything below is under phase_mu, but items_handed and
 * items_ahead, atomics written under it and read without it. */
#include "sched.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lifecycle.h"
#include "lockcheck.h"
#include "log.h"
#include "metrics.h"
#include "strays.h"

typedef struct claim_queue {
    char process[64];
    int waiters;                /* slots of process inside sched_claim_enter */
    int n;                      /* items queued, oldest first */
    int counted;                /* of them, those counted in items_handed */
    int waiting_shown;          /* the rest, as the metrics last showed them */
    int give_back;              /* sched_claim_give_back */
    sched_item items[SCHED_QUEUE_MAX];
    struct claim_queue *next;
} claim_queue;

static pthread_mutex_t phase_mu = PTHREAD_MUTEX_INITIALIZER;
/* Each slot's item record, and how many name an item (an atomic written
 * under item_mu, read without it: a hint). */
static pthread_mutex_t item_mu = PTHREAD_MUTEX_INITIALIZER;
static __thread char *item_record; /* the calling slot's; NULL on other threads */
static int items_noted;
static pthread_cond_t phase_cv; /* CLOCK_MONOTONIC */
static pthread_once_t phase_once = PTHREAD_ONCE_INIT;
static int finishing, claiming, claims_waiting;
static double claims_waiting_since; /* mono_now() when claims_waiting left 0 */
#define CLAIM_URGENT_S 0.05
static claim_queue *claim_queues; /* never freed (one per process) */
/* Items handed and not yet taken, in every queue or straight to a slot
 * (sched_note_handed): a slot handed one holds it. Of a queue's items
 * only as many count as slots wait there: the rest were claimed ahead,
 * and no slot holds them until one comes back for its next item. */
static int items_handed;
/* Items queued beyond the slots that wait for one (claimed ahead), in
 * every queue: what the metrics show, summed. */
static int items_ahead;

static void phase_init(void) { mono_cond_init(&phase_cv); }

/* Caller holds phase_mu; after q->n or q->waiters changed. (Takes
 * metrics.c's mu under it: host/README.md's lock order.) Invariant 4. */
static void recount(claim_queue *q) {
    LOCK_HELD(&phase_mu);
    int now = q->n < q->waiters ? q->n : q->waiters;
    __atomic_add_fetch(&items_handed, now - q->counted, __ATOMIC_RELAXED);
    q->counted = now;
    int ahead = q->n - now;
    if (ahead != q->waiting_shown) {
        __atomic_add_fetch(&items_ahead, ahead - q->waiting_shown, __ATOMIC_RELAXED);
        metrics_items_waiting(q->process, q->waiting_shown = ahead);
    }
}

/* Caller holds phase_mu: the oldest queued item, so an item claimed ahead
 * waits no longer than the ones claimed after it. Invariant 3. */
static void take_oldest(claim_queue *q, sched_item *out) {
    LOCK_HELD(&phase_mu);
    *out = q->items[0];
    memmove(q->items, q->items + 1, (size_t)(--q->n) * sizeof q->items[0]);
}

/* Caller holds phase_mu. */
static claim_queue *claim_queue_for(const char *process) {
    LOCK_HELD(&phase_mu);
    for (claim_queue *q = claim_queues; q; q = q->next)
        if (!strcmp(q->process, process)) return q;
    claim_queue *q = calloc(1, sizeof *q);
    if (!q) abort();
    snprintf(q->process, sizeof q->process, "%s", process);
    q->next = claim_queues;
    claim_queues = q;
    return q;
}

/* Invariants 1, 2 (docs/internals.md). */
void sched_finish_enter(void) {
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

void sched_finish_leave(void) {
    pthread_mutex_lock(&phase_mu);
    if (--finishing == 0) pthread_cond_broadcast(&phase_cv);
    pthread_mutex_unlock(&phase_mu);
}

/* Invariants 1, 2 (docs/internals.md). */
sched_claim_got sched_claim_enter(const char *process, double seconds, sched_item *out) {
    pthread_once(&phase_once, phase_init);
    struct timespec until = time_after(CLOCK_MONOTONIC, seconds);
    sched_claim_got got = SCHED_CLAIM_TIMEOUT;
    pthread_mutex_lock(&phase_mu);
    claim_queue *q = claim_queue_for(process);
    q->waiters++;
    recount(q);
    if (claims_waiting++ == 0) claims_waiting_since = mono_now();
    for (;;) {
        if (q->n > 0) {
            take_oldest(q, out);
            got = SCHED_CLAIM_HANDED;
            break;
        }
        if (!claiming && !finishing) {
            claiming = 1;
            got = SCHED_CLAIM_TURN;
            break;
        }
        if (lifecycle_state() != HOST_RUNNING) break;
        if (pthread_cond_timedwait(&phase_cv, &phase_mu, &until) == ETIMEDOUT) break;
    }
    q->waiters--;
    recount(q);
    claims_waiting--;
    /* Finishes wait while claims wait: one that gave up may free them. */
    if (got == SCHED_CLAIM_TIMEOUT) pthread_cond_broadcast(&phase_cv);
    pthread_mutex_unlock(&phase_mu);
    if (got == SCHED_CLAIM_HANDED) sched_note_item(out->machine);
    return got;
}

/* Invariant 1 (docs/internals.md). */
int sched_claim_alongside(int finishes) {
    pthread_once(&phase_once, phase_init);
    pthread_mutex_lock(&phase_mu);
    int got = !claiming && finishing == finishes;
    if (got) claiming = 1;
    pthread_mutex_unlock(&phase_mu);
    return got;
}

void sched_claim_leave(void) {
    pthread_mutex_lock(&phase_mu);
    claiming = 0;
    pthread_cond_broadcast(&phase_cv);
    pthread_mutex_unlock(&phase_mu);
}

int sched_claim_waiters(const char *process) {
    pthread_mutex_lock(&phase_mu);
    claim_queue *q = claim_queue_for(process);
    int n = q->waiters - q->n;
    pthread_mutex_unlock(&phase_mu);
    return n > 0 ? n : 0;
}

int sched_claim_queued(const char *process) {
    pthread_mutex_lock(&phase_mu);
    int n = claim_queue_for(process)->n;
    pthread_mutex_unlock(&phase_mu);
    return n;
}

/* Invariant 3 (docs/internals.md). */
int sched_claim_hand(const sched_item *item) {
    pthread_mutex_lock(&phase_mu);
    claim_queue *q = claim_queue_for(item->process);
    int ok = q->n < SCHED_QUEUE_MAX;
    if (ok) {
        q->items[q->n++] = *item;
        recount(q);
    }
    pthread_mutex_unlock(&phase_mu);
    return ok;
}

int sched_claim_take(const char *process, sched_item *out) {
    pthread_mutex_lock(&phase_mu);
    claim_queue *q = claim_queue_for(process);
    int got = q->n > 0;
    if (got) {
        take_oldest(q, out);
        recount(q);
    }
    pthread_mutex_unlock(&phase_mu);
    if (got) sched_note_item(out->machine);
    return got;
}

int sched_items_ahead(void) { return __atomic_load_n(&items_ahead, __ATOMIC_RELAXED); }

/* Invariant 4 (docs/internals.md). */
void sched_note_handed(int delta) { __atomic_add_fetch(&items_handed, delta, __ATOMIC_RELAXED); }

/* Invariant 4 (docs/internals.md). */
int sched_items_held(void) {
    return __atomic_load_n(&items_noted, __ATOMIC_RELAXED) + __atomic_load_n(&items_handed, __ATOMIC_RELAXED);
}

void sched_claim_give_back(const char *process, int on) {
    pthread_mutex_lock(&phase_mu);
    claim_queue_for(process)->give_back = on;
    pthread_mutex_unlock(&phase_mu);
}

/* Invariant 5 (docs/internals.md). */
int sched_give_back_waiting(void) {
    sched_item stale[SCHED_QUEUE_MAX];
    int n = 0;
    double before = mono_now() - SCHED_GIVE_BACK_S;
    pthread_mutex_lock(&phase_mu);
    for (claim_queue *q = claim_queues; q; q = q->next) {
        int k = 0; /* the oldest come first */
        while (q->give_back && k < q->n && q->items[k].started <= before && n < SCHED_QUEUE_MAX)
            stale[n++] = q->items[k++];
        if (k == 0) continue;
        q->n -= k;
        memmove(q->items, q->items + k, (size_t)q->n * sizeof q->items[0]);
        recount(q);
    }
    pthread_mutex_unlock(&phase_mu);
    for (int i = 0; i < n; i++) {
        log_kv(LOG_INFO, "item claimed ahead given back: it waited in the host too long", "machine",
               stale[i].machine, "process", stale[i].process, NULL);
        metrics_item_given_back(stale[i].process);
        strays_give_back(stale[i].token);
    }
    return n;
}

/* ---- the item each slot holds ---------------------------------------------- */

void sched_bind_item(char *record) { item_record = record; }

void sched_note_item(const char *machine) {
    if (!item_record) return;
    pthread_mutex_lock(&item_mu);
    int was = item_record[0] != '\0', is = machine && machine[0];
    if (was != is) __atomic_add_fetch(&items_noted, is ? 1 : -1, __ATOMIC_RELAXED);
    snprintf(item_record, SCHED_ITEM_LEN, "%s", machine ? machine : "");
    pthread_mutex_unlock(&item_mu);
}

void sched_item_read(const char *record, char *out, size_t len) {
    pthread_mutex_lock(&item_mu);
    snprintf(out, len, "%s", record);
    pthread_mutex_unlock(&item_mu);
}
