/* outage.h -- one account of a database outage, for the log.
 *
 * While the database cannot be reached (or refuses us: a read-only
 * standby), every thread that tries fails, several times a second. This
 * module turns those failures into a few lines: one when the outage
 * starts, with its reason; then at most one every OUTAGE_REPEAT_S with the
 * count of failures since the line before (and the reason, if it
 * changed); and one when it ends, with its length. The heartbeat owns the
 * outage (it tries the database on a steady clock); others only count
 * in it. Safe from any thread. */
#ifndef BMDB_OUTAGE_H
#define BMDB_OUTAGE_H

#define OUTAGE_REPEAT_S 10.0

/* A failure to reach the database (what: "heartbeat", "new session";
 * why: the one-line reason, never a password): starts an outage, or
 * counts in the one under way. */
void outage_failed(const char *what, const char *why);
/* If an outage is under way, counts a failure in it and returns 1 (the
 * caller need not log it); 0 otherwise. */
int outage_counted(void);
/* The database answered: ends the outage under way, if any. */
void outage_ended(void);

#endif
