/* report.h -- the read-only operator commands: status and history.
 *
 * Plain aligned text on out, one row per line and at most 100 columns (a
 * long value is cut, a newline shown as a space), so the output reads in
 * a terminal and greps in a script; or, with json, one JSON object with
 * stable keys and values whole, for scripts. */
#ifndef BMDB_REPORT_H
#define BMDB_REPORT_H

#include <stdio.h>
#include <stddef.h>
#include <libpq-fe.h>

/* Sessions, work in flight, pauses, holds, active backoffs, per-process
 * counts and latest failures, loops and their holders and latest events.
 * 0, or -1 with err. */
int report_status(PGconn *c, FILE *out, int json, char *err, size_t errlen);
/* The audit trail of one machine, oldest first. -2 when machine is not a
 * UUID, -1 on a database error. */
int report_history(PGconn *c, const char *machine, FILE *out, int json, char *err, size_t errlen);

#endif
