/* control.h -- operators' control of work: cancel, pause, hold, from a
 * script or the command line. (A body whose lock is taken away learns it
 * through items.h.)
 *
 * The operations run inside a caller's transaction (tx.h): the command
 * line's has no session, a script's is fenced by its own. 1 when they
 * changed something, 0 when there was nothing to change, -1 with e set. */
#ifndef BMDB_CONTROL_H
#define BMDB_CONTROL_H

#include <stdio.h>
#include "pool.h"
#include "tx.h"

/* Ends the lock on (machine, process) now, recorded Canceled with the
 * reason; token gets the claim's token, for the holder's notification. */
int control_cancel(tx *t, const char *machine, const char *process, const char *reason, char *token,
                   size_t tokenlen, tx_error *e);
int control_pause(tx *t, const char *process, const char *reason, tx_error *e);
int control_resume(tx *t, const char *process, tx_error *e);
/* Hold and unhold are recorded in the machine's history (process '*'). */
int control_hold(tx *t, const char *machine, const char *reason, tx_error *e);
int control_unhold(tx *t, const char *machine, const char *reason, tx_error *e);
/* 1 when process is paused (why gets the reason), 0 when not. */
int control_paused(tx *t, const char *process, char *why, size_t whylen, tx_error *e);

/* Registers the processes a host's workers run, so work_blocked lists the
 * pairs a hold blocks. Errors are logged: claims refuse holds anyway. */
void control_register(pool *p, const char *const *processes, int n);
/* A slot saw process paused (or not): logged once per change per host. */
void control_note_pause(const char *process, int paused, const char *why);
/* 1 when the last that slots of this host saw of process was a pause. */
int control_seen_paused(const char *process);

/* bmdb-host cancel | pause | resume | hold | unhold */
typedef struct control_args {
    const char *cmd, *machine, *process, *reason;
} control_args;
/* Checks the arguments before any database work. 0, or -1 with err. */
int control_parse(const char *cmd, int argc, char **argv, control_args *a, char *err, size_t errlen);
/* Runs it and prints the outcome on out: 1 done, 0 nothing to do (cancel:
 * no lock held), -1 with err. */
int control_run(pool *p, const control_args *a, FILE *out, char *err, size_t errlen);

#endif
