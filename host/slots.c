/* slots.c -- what the slot threads share with the Lua they run.
 *
 * Globals and their guards (lock order: host/README.md):
 *   queues, everyone_gen, each queue's counts   idle_mu
 *   item records bound by slot_bind_item        item_mu
 *   generation, claims/retries, notify          atomics, no lock */
#include "slots.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lifecycle.h"

/* ---- idle waits ---------------------------------------------------------- */

typedef struct idle_queue {
    char process[64];
    int waiting, tokens;
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
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(&q->cv, &a);
    pthread_condattr_destroy(&a);
    q->next = queues;
    queues = q;
    return q;
}

int slot_idle_wait(const char *process, double seconds) {
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

/* ---- the item each slot holds ---------------------------------------------- */

static pthread_mutex_t item_mu = PTHREAD_MUTEX_INITIALIZER;
static __thread char *item; /* the calling slot's record; NULL on other threads */

void slot_bind_item(char *record) { item = record; }

void slot_note_item(const char *machine) {
    if (!item) return;
    pthread_mutex_lock(&item_mu);
    snprintf(item, SLOT_ITEM_LEN, "%s", machine ? machine : "");
    pthread_mutex_unlock(&item_mu);
}

void slot_item_read(const char *record, char *out, size_t len) {
    pthread_mutex_lock(&item_mu);
    snprintf(out, len, "%s", record);
    pthread_mutex_unlock(&item_mu);
}
