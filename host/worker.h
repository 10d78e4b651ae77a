/* worker.h -- the worker loop: slot threads, idle waits, the listener.
 *
 * A worker script returns bmdb.worker definitions; each gets `concurrency`
 * slots. A slot is a thread with its own lua_State running the script; the
 * loop itself (claim, run, decide) is Lua, in bmdb._serve. This module owns
 * the threads and the waits between items: an idle slot sleeps until its
 * poll interval passes or a wake-up for its process arrives, and a wake-up
 * releases ONE idle slot, which passes it on only if it found work, so one
 * NOTIFY never stampedes every slot into the same query. */
#ifndef BMDB_WORKER_H
#define BMDB_WORKER_H

#include "pool.h"

typedef struct worker_spec {
    char process[64];
    int concurrency;
} worker_spec;

struct snapshot;
/* The code the slots run: set once before the first workers_start()
 * (generation 1), then by every successful reload, which moves the
 * generation on; slots compare it at every item boundary and load exactly
 * this snapshot. Takes its own reference. */
void workers_set_code(struct snapshot *code);
/* Starts the slots for the script's workers (and, once, the listener).
 * Called again after a reload with the new list: slots are added where
 * concurrency grew; surplus slots end themselves at their next boundary. */
int workers_start(pool *p, int argc, char **argv, const worker_spec *specs, int nspecs);
/* Slots still running. */
int workers_live(void);
/* Waits up to seconds for every slot to end; 0 when they all did. */
int workers_wait(double seconds);
/* Logs every slot still running (process, slot, the machine it claimed
 * last), after workers_wait() gave up on them; returns how many. */
int workers_report_stuck(void);
/* Ends the listener and joins every slot thread (after workers_wait). */
void workers_stop(void);

/* The code generation slots compare at every item boundary. */
unsigned workers_generation(void);
/* The calling slot claimed machine (NULL: released it), for the report
 * on slots that will not stop; a no-op outside slot threads. */
void worker_note_item(const char *machine);

/* Idle slots: sleep up to seconds; 1 when woken for work, 0 otherwise. */
int worker_idle_wait(const char *process, double seconds);
/* One idle slot of process (every process if NULL or "") gets a wake-up. */
void worker_wake(const char *process);
/* Every idle slot wakes (shutdown, reload). */
void worker_wake_everyone(void);
/* Counters for the log line at stop: items claimed, and transactions the
 * slots had to retry (40001/40P01), the price of SERIALIZABLE claims. */
void worker_count_claim(void);
void worker_count_retry(void);
void worker_counts(unsigned long *claims, unsigned long *retries);

/* True once the listener has LISTEN running: release may NOTIFY. */
int worker_notify_enabled(void);

#endif
