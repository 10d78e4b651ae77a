/* slots.c -- idle slots and their wake-ups, local and fleet-wide
 * (slots.h). Who claims what is the scheduler's (sched.c).
 *
 * Globals and their guards (lock order: host/README.md):
 *   queues, everyone_gen, each queue's counts   idle_mu
 *   notify_enabled, fleet_pending                atomics, no lock */
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
#include "lockcheck.h"

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

/* Caller holds idle_mu. */
static idle_queue *queue_for(const char *process) {
    LOCK_HELD(&idle_mu);
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

/* Caller holds idle_mu. */
static void wake_one(idle_queue *q) {
    LOCK_HELD(&idle_mu);
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

/* ---- notify ------------------------------------------------------------------ */

static int notify_enabled;

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
