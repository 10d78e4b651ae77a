/* strays.h -- work rows of our own session that no part of the host holds.
 *
 * A claim's lock rides with its COMMIT. When the connection breaks with
 * that COMMIT in flight, the host cannot tell whether it landed: if it
 * did, the work rows are the live session's, so no collector ends them
 * and work_blocked keeps their machines from every host, yet no slot runs
 * them. Only this host can see that they are strays, by comparing its
 * session's rows with the tokens it has read back from its own locks.
 *
 * Every token a lock statement returns is owned (work.c) until the item's
 * body is done with it (core.untrack). Each interval the heartbeat thread
 * reads its session's work rows; a row whose token is not owned in two
 * passes in a row (an interval apart, far longer than reading a committed
 * lock's answer takes) is released, recorded Canceled, so its machine is
 * claimable again. Off unless the host runs workers (strays_enable).
 * An item the host gives back (strays_give_back) needs no such wait:
 * strays_release_given releases it at the heartbeat's next round, which
 * the host's main loop then asks for at once. */
#ifndef BMDB_STRAYS_H
#define BMDB_STRAYS_H

#include <libpq-fe.h>

void strays_enable(void);
/* A lock statement returned token: an item of this host from now on. */
void strays_own(const char *token);
/* The item of token is done with (settled, or never to be run). */
void strays_disown(const char *token);
/* The item of token was claimed ahead and will not run here (sched.h,
 * SCHED_GIVE_BACK_S): strays_release_given releases its row, recorded
 * Canceled, so another slot or host may claim it. */
void strays_give_back(const char *token);
/* Releases what was given back since the last call, on the heartbeat's
 * connection, bounded by until; what fails is taken for strays later. */
void strays_release_given(PGconn **cp, const char *session, double until);
/* One pass over session's work rows on the heartbeat's connection, bounded
 * by until (monotonic seconds). Failures are logged and retried next pass. */
void strays_sweep(PGconn **cp, const char *session, double until);

#endif
