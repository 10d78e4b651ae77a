/* lifecycle.c -- the host's run state and the waits it can cut short.
 *
 * One mutex and one condition variable: state changes and kicks are rare,
 * and every interruptible wait in the host (bmdb.sleep, idle worker slots,
 * the heartbeat's pause) sleeps here so a single broadcast reaches all;
 * waits in poll() (host-owned I/O) watch an eventfd that the same
 * broadcast writes to. */
#include "lifecycle.h"
#include "lockcheck.h"

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

/* state and kick_gen are under lock; `changed` waits on CLOCK_MONOTONIC.
 * lock is taken inside session.c's mu, slots.c's idle_mu and sched.c's
 * phase_mu, never around them (host/README.md). */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t changed;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static host_state state = HOST_RUNNING;
static unsigned kick_gen = 0;
static int watched[LIFECYCLE_WATCH_MAX]; /* eventfds, under lock */
static int nwatched;

/* Under lock. An eventfd's write never blocks short of 2^64 - 1 unread. */
static void wake_watchers(void) {
    LOCK_HELD(&lock);
    uint64_t one = 1;
    for (int i = 0; i < nwatched; i++)
        if (write(watched[i], &one, sizeof one) < 0) {
            /* EAGAIN: the counter is full, so the fd is readable anyway */
        }
}

int lifecycle_watch(int fd) {
    pthread_mutex_lock(&lock);
    int ok = nwatched < LIFECYCLE_WATCH_MAX;
    if (ok) watched[nwatched++] = fd;
    pthread_mutex_unlock(&lock);
    return ok ? 0 : -1;
}

void lifecycle_unwatch(int fd) {
    pthread_mutex_lock(&lock);
    for (int i = 0; i < nwatched; i++)
        if (watched[i] == fd) {
            watched[i] = watched[--nwatched];
            break;
        }
    pthread_mutex_unlock(&lock);
}

void mono_cond_init(pthread_cond_t *cv) {
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(cv, &a);
    pthread_condattr_destroy(&a);
}

static void init_cond(void) { mono_cond_init(&changed); }

double mono_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

struct timespec time_after(clockid_t clock, double seconds) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    if (seconds < 0) seconds = 0;
    double whole = floor(seconds);
    ts.tv_sec += (time_t)whole;
    ts.tv_nsec += (long)((seconds - whole) * 1e9);
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

void mono_sleep(double seconds) {
    if (seconds <= 0) return;
    struct timespec ts = {.tv_sec = (time_t)seconds};
    ts.tv_nsec = (long)((seconds - (double)ts.tv_sec) * 1e9);
    while (nanosleep(&ts, &ts) != 0) {
    }
}

host_state lifecycle_state(void) {
    pthread_mutex_lock(&lock);
    host_state s = state;
    pthread_mutex_unlock(&lock);
    return s;
}

void lifecycle_advance(host_state to) {
    pthread_once(&once, init_cond);
    pthread_mutex_lock(&lock);
    if (to > state) state = to;
    kick_gen++;
    pthread_cond_broadcast(&changed);
    wake_watchers();
    pthread_mutex_unlock(&lock);
}

void lifecycle_kick(void) {
    pthread_once(&once, init_cond);
    pthread_mutex_lock(&lock);
    kick_gen++;
    pthread_cond_broadcast(&changed);
    wake_watchers();
    pthread_mutex_unlock(&lock);
}

unsigned lifecycle_kick_gen(void) {
    pthread_mutex_lock(&lock);
    unsigned g = kick_gen;
    pthread_mutex_unlock(&lock);
    return g;
}

int lifecycle_wait(double seconds, host_state stop_at, unsigned *kick_seen) {
    pthread_once(&once, init_cond);
    struct timespec until = time_after(CLOCK_MONOTONIC, seconds);
    int early = 0;
    pthread_mutex_lock(&lock);
    for (;;) {
        if (state >= stop_at || (kick_seen && *kick_seen != kick_gen)) {
            early = 1;
            break;
        }
        if (pthread_cond_timedwait(&changed, &lock, &until) != 0) break; /* timed out */
    }
    if (kick_seen) *kick_seen = kick_gen;
    pthread_mutex_unlock(&lock);
    return early;
}
