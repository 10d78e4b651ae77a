/* report.h -- the read-only operator commands: status and history.
 *
 * Plain aligned text on out, one row per line, so the output reads in a
 * terminal and greps in a script. */
#ifndef BMDB_REPORT_H
#define BMDB_REPORT_H

#include <stdio.h>
#include <stddef.h>
#include <libpq-fe.h>

/* Sessions, work in flight and active backoffs. 0, or -1 with err. */
int report_status(PGconn *c, FILE *out, char *err, size_t errlen);
/* The audit trail of one machine, oldest first. -2 when machine is not a
 * UUID, -1 on a database error. */
int report_history(PGconn *c, const char *machine, FILE *out, char *err, size_t errlen);

#endif
