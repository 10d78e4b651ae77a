/* worker.h -- the worker loop's threads: slots and the listener.
 *
 * A worker script returns bmdb.worker definitions; each gets `concurrency`
 * slots. A slot is a thread with its own lua_State running the script; the
 * loop itself (claim, run, decide) is Lua, in bmdb.internal's serve. This
 * module owns the threads; what they share with the Lua they run (idle
 * waits, wake-ups, the code generation) is slots.h. */
#ifndef BMDB_WORKER_H
#define BMDB_WORKER_H

#include "lstate.h"
#include "pool.h"

/* Once, before anything else here: the pool the listener borrows from and
 * the script's arguments every slot state gets. They never change after,
 * so the slots read them without a lock. */
void workers_init(pool *p, int argc, char **argv);

struct snapshot;
/* The code the slots run: set once before the first workers_start()
 * (generation 1), then by every successful reload, which moves the
 * generation on; slots compare it at every item boundary and load exactly
 * this snapshot. Takes its own reference. */
void workers_set_code(struct snapshot *code);
/* Starts the slots for the script's workers (and, once, the listener).
 * Called again after a reload with the new list: slots are added where
 * concurrency grew; surplus slots end themselves at their next boundary. */
int workers_start(const worker_spec *specs, int nspecs);
/* Slots still running. */
int workers_live(void);
/* Waits up to seconds (monotonic) for every slot to end; 0 when they all
 * did, else how many still run. */
int workers_wait(double seconds);
/* Logs every slot still running (process, slot, the machine it claimed
 * last), after workers_wait() gave up on them; returns how many. */
int workers_report_stuck(void);
/* Ends the listener and joins every slot thread (after workers_wait). */
void workers_stop(void);

#endif
