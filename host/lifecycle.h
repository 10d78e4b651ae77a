/* lifecycle.h -- the host's run state, shared by every thread.
 *
 * RUNNING -> DRAINING (first signal: no new claims, items in flight go on)
 * -> CANCELLING (grace over, second signal, or a one-off script: every bmdb
 * call raises and Lua hooks interrupt busy bodies). Waits that must end
 * early on shutdown or session loss go through lifecycle_wait(). */
#ifndef BMDB_LIFECYCLE_H
#define BMDB_LIFECYCLE_H

typedef enum { HOST_RUNNING, HOST_DRAINING, HOST_CANCELLING } host_state;

host_state lifecycle_state(void);
/* Moves forward only; wakes every lifecycle_wait(). */
void lifecycle_advance(host_state to);
/* Wakes every waiter without a state change (session lost, reload...). */
void lifecycle_kick(void);

/* Sleeps up to seconds. Returns 0 after a full sleep, 1 when woken early
 * because stop_at or a later state was reached, or lifecycle_kick() ran
 * and *kicked_gen differs from the current kick generation. */
int lifecycle_wait(double seconds, host_state stop_at, unsigned *kick_gen);
unsigned lifecycle_kick_gen(void);

/* Waits outside this module (poll() in host-owned I/O: iofence.h) watch an
 * eventfd: every advance and every kick writes to each watched fd, so a
 * poll that includes it returns as a lifecycle_wait would. At most
 * LIFECYCLE_WATCH_MAX at once; 0, or -1 when full. */
#define LIFECYCLE_WATCH_MAX 1024
int lifecycle_watch(int fd);
void lifecycle_unwatch(int fd);

/* Monotonic seconds, the one clock for local deadlines. */
double mono_now(void);
/* The absolute time `seconds` from now on clock, for timed waits. */
#include <time.h>
struct timespec time_after(clockid_t clock, double seconds);
/* A condition variable whose timed waits measure CLOCK_MONOTONIC, so that
 * stepping the wall clock cannot stall them. */
#include <pthread.h>
void mono_cond_init(pthread_cond_t *cv);
/* Sleeps regardless of state changes (retry pauses). */
void mono_sleep(double seconds);

#endif
