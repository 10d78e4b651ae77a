/* report.c -- the read-only operator commands: status and history. */
#include "report.h"

#include <string.h>

#include "pqerr.h"
#include "work.h"

/* Prints a result as aligned columns under a title. */
static int print_table(PGconn *c, FILE *out, const char *title, const char *sql, int nparams,
                       const char *const *params, char *err, size_t errlen) {
    PGresult *r = PQexecParams(c, sql, nparams, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        pq_error_text(c, r, err, errlen);
        PQclear(r);
        return -1;
    }
    int rows = PQntuples(r), cols = PQnfields(r);
    int width[16] = {0};
    if (cols > 16) cols = 16;
    for (int j = 0; j < cols; j++) width[j] = (int)strlen(PQfname(r, j));
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) {
            int w = (int)strlen(PQgetvalue(r, i, j));
            if (w > width[j]) width[j] = w;
        }
    if (title) fprintf(out, "%s (%d)\n", title, rows);
    for (int j = 0; j < cols; j++) fprintf(out, "%s%-*s", j ? "  " : "  ", width[j], PQfname(r, j));
    fputc('\n', out);
    for (int i = 0; i < rows; i++) {
        for (int j = 0; j < cols; j++)
            fprintf(out, "  %-*s", width[j], PQgetisnull(r, i, j) ? "" : PQgetvalue(r, i, j));
        fputc('\n', out);
    }
    PQclear(r);
    return 0;
}

int report_status(PGconn *c, FILE *out, char *err, size_t errlen) {
    static const struct { const char *title, *sql; } tables[] = {
        {"sessions",
         "SELECT session_id, component_name AS component, runtime_info AS runtime, "
         "CASE WHEN deadline > now() THEN 'live' ELSE 'expired' END AS state, "
         "date_trunc('second', deadline) AS deadline "
         "FROM sessions ORDER BY created_at"},
        {"work in flight",
         "SELECT w.machine_id, w.process, w.session_id, s.runtime_info AS runtime, "
         "date_trunc('second', w.started_at) AS started_at, "
         "date_trunc('second', w.deadline) AS deadline, "
         "CASE WHEN s.deadline <= now() THEN 'session expired' "
         " WHEN w.deadline <= now() THEN 'timed out; its slot is stuck or stopping' "
         " ELSE 'running' END AS state "
         "FROM work w JOIN sessions s ON s.session_id = w.session_id ORDER BY w.started_at"},
        {"paused processes",
         "SELECT process, date_trunc('second', paused_at) AS since, pause_reason AS reason "
         "FROM processes WHERE paused_at IS NOT NULL ORDER BY paused_at"},
        {"machines on hold",
         "SELECT machine_id, date_trunc('second', held_at) AS since, reason "
         "FROM machine_holds ORDER BY held_at"},
        {"backoffs",
         "SELECT machine_id, process, attempts, last_seconds, "
         "date_trunc('second', backoff_until) AS until, cause "
         "FROM work_backoff WHERE backoff_until > now() ORDER BY backoff_until"},
    };
    for (size_t i = 0; i < sizeof tables / sizeof *tables; i++) {
        if (i) fputc('\n', out);
        if (print_table(c, out, tables[i].title, tables[i].sql, 0, NULL, err, errlen) < 0) return -1;
    }
    return 0;
}

int report_history(PGconn *c, const char *machine, FILE *out, char *err, size_t errlen) {
    if (!work_valid_uuid(machine)) {
        snprintf(err, errlen, "history: machine id is not a UUID: %s", machine);
        return -2;
    }
    const char *params[] = {machine};
    return print_table(c, out, NULL,
                       "SELECT occurred_at, process, event, session_id, cause FROM work_history "
                       "WHERE machine_id = $1 ORDER BY occurred_at, history_id",
                       1, params, err, errlen);
}
