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

/* The statements the status report and the status page share. */
/* Per process: work rows, active backoffs, and the Failed events of the
 * last hour (distinct machines, and events), in one pass over the four
 * sources; every registered process shows, idle ones as zeros. */
#define REPORT_PROCESS_COUNTS_SQL                                                                  \
    "SELECT process, sum(w)::INT8 AS in_flight, sum(b)::INT8 AS in_backoff, "                      \
    "count(DISTINCT f)::INT8 AS failed_machines_1h, count(f)::INT8 AS failures_1h FROM ("          \
    " SELECT process, 1 AS w, 0 AS b, NULL::UUID AS f FROM work"                                   \
    " UNION ALL SELECT process, 0, 1, NULL FROM work_backoff WHERE backoff_until > now()"          \
    " UNION ALL SELECT process, 0, 0, machine_id FROM work_history"                                \
    "  WHERE event = 'Failed' AND occurred_at > now() - INTERVAL '1 hour'"                         \
    " UNION ALL SELECT process, 0, 0, NULL FROM processes"                                         \
    ") AS t GROUP BY process ORDER BY process"

/* The Failed events of the last day, numbered newest first per process:
 * one range of the history's age index, however long the history. */
#define REPORT_LATEST_FAILURES_SQL                                                                 \
    "SELECT h.process, h.machine_id, h.occurred_at, h.history_id, h.session_id, h.cause, "         \
    "row_number() OVER (PARTITION BY h.process ORDER BY h.occurred_at DESC, h.history_id DESC) AS n " \
    "FROM work_history h WHERE h.event = 'Failed' AND h.occurred_at > now() - INTERVAL '24 hours'"

/* A loop's holder is its session while that session is live. */
#define REPORT_LOOPS_FROM_SQL                                                                      \
    "FROM loops l LEFT JOIN sessions s ON s.session_id = l.session_id AND s.deadline > now() "     \
    "ORDER BY l.name"

/* Each loop's newest ten events, along the (name, occurred_at) index. */
#define REPORT_LOOP_HISTORY_FROM_SQL                                                               \
    "FROM loops l CROSS JOIN LATERAL (SELECT occurred_at, history_id, event, session_id, cause "   \
    "FROM loop_history h WHERE h.name = l.name ORDER BY h.occurred_at DESC, h.history_id DESC LIMIT 10) AS h " \
    "ORDER BY l.name, h.occurred_at DESC, h.history_id DESC"

/* Sessions, work in flight, pauses, holds, active backoffs, per-process
 * counts and latest failures, loops and their holders and latest events.
 * 0, or -1 with err. */
int report_status(PGconn *c, FILE *out, int json, char *err, size_t errlen);
/* The audit trail of one machine, oldest first. -2 when machine is not a
 * UUID, -1 on a database error. */
int report_history(PGconn *c, const char *machine, FILE *out, int json, char *err, size_t errlen);

#endif
